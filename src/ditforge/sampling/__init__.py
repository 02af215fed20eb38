"""Sampling: a saved model -> class-conditional samples with classifier-free guidance.

| module | what it answers |
|---|---|
| `load.py` | which model: a run, checkpoint, hub or diffusers folder, or an official `.pt`, and its decoder |
| `generate.py` | the samples: noise seeds, a guided batch, `generate`, a preview picture |
| `options.py` | the options that `sample`, `eval` and the previews share, defined once |
| `command.py` | the `sample` command: its options and the PNG grid |
| `bulk.py` | `sample --out X.npz`: many samples, resumable, over ranks |

Sampling sits above the models, the objectives and the formats (`formats/`), and below
evaluation and training's previews, which draw through `generate.py`.
"""
