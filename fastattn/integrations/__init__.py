"""Integrations of fastattn into other libraries (each imports its library lazily, on use).

* ``fastattn.integrations.transformers.register()``: ``attn_implementation="fastattn"`` for HuggingFace
  transformers models.
"""
