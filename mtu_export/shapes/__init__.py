"""The shapes world: the procedural demo domain the project trains and ships its own small models on (no model hub
is reachable where it is built), apart from the MTU core.

- `world.py`       scenes, their captions and the example families of the four built-in tasks
- `reader.py`      the text-to-image metric: a scene reader that checks an image against its caption
- `vocab.py`       the world's language as a standard CLIP BPE tokenizer
- `world_grid.py`  example grids and the demo's input files
- `tiny.py`        toy pipelines (tests, the demo) built by the real recipes
- `pretrain.py`    the recipe that trains the shipped base model from scratch
"""
