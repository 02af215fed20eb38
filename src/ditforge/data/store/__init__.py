"""The latent store: images encoded once by the autoencoder, read many times by training.

| module | holds |
|---|---|
| `format.py` | the folder layout, shard headers and names, atomic writes, memory maps |
| `writer.py` | `LatentWriter` (one rank's records, resumable) and `finalize_store` (the manifest) |
| `reader.py` | `LatentStore` (memory-mapped reader) and `sample_posterior` (training latents) |
| `extract.py` | `extract`: images -> autoencoder -> writer, in batches, over ranks, resumably; `extract_store` (the command) |
"""

from ditforge.data.store.extract import SKIP_ERRORS, ExtractOptions, extract, extract_store, items_digest
from ditforge.data.store.format import FORMAT, MANIFEST, RECORD_FIELDS, SHARD_DIR, STORE_DTYPES, VERSION, rank_range
from ditforge.data.store.reader import LatentStore, sample_posterior
from ditforge.data.store.writer import LatentWriter, finalize_store

__all__ = [
    "FORMAT", "MANIFEST", "RECORD_FIELDS", "SHARD_DIR", "SKIP_ERRORS", "STORE_DTYPES", "VERSION",
    "ExtractOptions", "LatentStore", "LatentWriter", "extract", "extract_store", "finalize_store", "items_digest", "rank_range", "sample_posterior",
]
