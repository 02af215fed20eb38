"""Model formats: ditforge's weights read from, and written to, the formats other code uses.

Each format is one module with a reader (-> `ModelWeights`) and a writer:

| module | format | who reads it |
|---|---|---|
| `official.py` | the flat state dict `.pt` of facebookresearch/DiT and willisma/SiT | their `models.py` (`strict=True`) and `sample.py` |
| `diffusers.py` | a `DiTPipeline` folder (transformer, VAE, scheduler, `id2label`) | diffusers' `DiTPipeline.from_pretrained` |
| `hub.py` | ditforge's shareable folder: `model.safetensors`, `config.json`, a model card | `ditforge sample / eval / export / train --init-from` |

`weights.py` holds what every reader returns. Formats sit above the model (`models/`), the
objectives and the checkpoint files (`train/checkpoint.py`), and below sampling, which reads a
model through them, and the `export` command.
"""
