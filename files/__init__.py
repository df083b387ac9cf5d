"""How vqtok writes files: a file appears under its final name complete or not at all.

The one implementation of atomic writes, for every part of vqtok (``tokenizer``, ``storage``
and ``flows`` all import it; it imports only the standard library, so the layering between
them holds).
"""
