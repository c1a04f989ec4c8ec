"""The files task: conversation records on disk (records), a Hugging Face tokenizer and its chat
template (chat), media decoding (media), the per-record metadata index (index), and the stream
of packed batches over them (source). numpy, Pillow, soundfile and tokenizers; never jax."""
