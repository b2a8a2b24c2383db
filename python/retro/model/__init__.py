"""The RETRO model: its configuration, the decoder and encoder, the contract every model keeps, the
copy prior, the decoding caches, the sliced loss, the saved-model format, the FLOPs count."""
