"""The model: its configuration (dataclasses, presets, JSON round-trip), the tokenizer and vocabulary, the
layers, the vision and text transformers, BLIP itself (`blip`), the masked autoencoder, the losses and the FLOP
count. It imports only the bottom layer (paths, io, speed): nothing of data, runs, evaluation or training.
"""
