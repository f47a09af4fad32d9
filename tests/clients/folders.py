"""Folders of synthetic images for the batch-extraction tests (one of them corrupt on purpose)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from cotap.training.data.synthetic import SceneConfig, SyntheticScenes


def image_folder(root: Path, n: int, corrupt: tuple[int, ...] = (), size: int = 64) -> list[str]:
    """`n` synthetic scenes as JPEG/PNG files in nested folders; the images at the `corrupt`
    indices are truncated JPEGs (their header still reads fine). Returns the relative paths."""
    scenes = SyntheticScenes(n, seed=11, config=SceneConfig(size=size))
    paths = []
    for i in range(n):
        rel = f"part{i % 3}/{'deep/' if i % 5 == 0 else ''}img{i:04d}.{'png' if i % 4 == 0 else 'jpg'}"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(scenes[i].image)
        if i in corrupt:
            rel = rel.rsplit(".", 1)[0] + ".jpg"
            path = root / rel
            image.save(path, "JPEG", quality=90)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 3])
        else:
            image.save(path)
        paths.append(rel)
    return sorted(paths)
