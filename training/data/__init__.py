"""Training data: synthetic scenes, image folders, nearest-neighbour pairs and multi-crop views.

- `synthetic`: procedural scenes with class masks (`SyntheticScenes`, `SceneConfig`, `write_scenes`);
- `folders`: `ImageFolder`, `SegmentationFolder`, `open_dataset("DIR" | "synthetic:N[:seed[:size]]")`;
- `neighbours`: CLS kNN files (`build_knn_file`, `load_knn_file`, `nearest_neighbours`, `embed_cls`);
- `views`: 2 global + L local crops with overlap boxes (`ViewConfig`, `make_views`, `overlap_boxes`);
- `pairs`: anchor/partner view sets (`PairedViews`, `collate_pairs`, `PairBatch`, `ViewBatch`).

Submodules are imported explicitly (`from cotap.training.data.synthetic import ...`) so that the
torch-free ones (`synthetic`, `folders`) stay torch-free. See docs/data.md.
"""
