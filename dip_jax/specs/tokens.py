"""Reserved token ids of the built-in vocabulary (the generated tasks' tokens): the encoders'
placeholders are part of their specs, and every task writes the same ids."""

PAD, BOS, EOS, IMG, AUD, QUESTION = 0, 1, 2, 3, 4, 5
DIGIT0 = 6            # digits 0-9 are 6..15
ORDINAL0 = 16         # "image #i" markers, 16..31
N_ORDINALS = 16
WORD0 = 32            # first free text token
