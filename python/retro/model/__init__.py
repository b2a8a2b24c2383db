"""The RETRO model: its configuration, the decoder and encoder, the decoding caches, the sliced
loss, the saved-model format."""
