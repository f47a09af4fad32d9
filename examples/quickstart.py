# %% [markdown]
# # cotap client quick start
#
# A notebook-style script (`# %%` cells: run it in VS Code / Jupyter, or `python examples/quickstart.py`).
# It needs a running server (`cotap serve`, default http://127.0.0.1:8000, or set COTAP_URL) and the
# plain client install (`pip install -e .` in the checkout: no torch).

# %%
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from cotap.client import Client, read_features
from cotap.client.plots import correspondence_lines, prototype_overlay, save

client = Client()  # url=COTAP_URL or http://127.0.0.1:8000, api_key=COTAP_API_KEY
info = client.models()
model = info.model()
print(f"{client.url}: {model.name} ({model.arch}, patch {model.patch_size}, {model.embed_dim}-d)")
print("limits:", info.limits)

# %% [markdown]
# Two images to play with: a smooth synthetic scene, and the same scene shifted and zoomed.
# Any path, encoded bytes, PIL image or uint8 (H, W, 3) array works as an image.

# %%
yy, xx = np.mgrid[0:192, 0:256]
a = np.stack([128 + 100 * np.sin(xx / 17.0), 128 + 100 * np.cos(yy / 23.0), (xx + yy) % 256], -1)
a[60:130, 90:170] = (230, 60, 40)  # a red block
a = a.astype(np.uint8)
b = np.asarray(Image.fromarray(a[20:180, 30:240]).resize((256, 192)))

# %% [markdown]
# ## Patch embeddings
# One image gives an `Embedding`; a list gives an `EmbedBatch` (in order, split into as many
# requests as the server's limits need). Arrays are float16 unless you ask for float32.

# %%
e = client.embed(a)
print(e.patch.shape, e.cls.shape, e.patch.dtype, e.grid, e.model, e.bundle_sha256[:12])
batch = client.embed([a, b], normalize=True, dtype="float32")
print(batch.patch.shape, batch.cls.shape)
# cosine similarity of the two images' cls embeddings
print(
    "cls cosine:",
    float(batch.cls[0] @ batch.cls[1] / np.linalg.norm(batch.cls[0]) / np.linalg.norm(batch.cls[1])),
)

# %% [markdown]
# ## Prototypes: which of the model's prototypes each patch belongs to

# %%
p = client.prototypes(a, top_k=3)
print(p.ids.shape, p.probs.shape, "prototypes used:", int((p.counts() > 0).sum()))
out = Path(tempfile.mkdtemp())
save(prototype_overlay(a, p), out / "prototypes.png")

# %% [markdown]
# ## Correspondences: best match in B of every patch of A, and whether it is mutual

# %%
c = client.correspond(a, b)
m = c.matches()  # mutual matches, best first: grid coordinates (row, col)
print(f"{len(m)} mutual matches of {c.match.size} patches; best {m.source[0]} -> {m.target[0]}")
save(correspondence_lines(a, b, c), out / "matches.png")

# %% [markdown]
# ## A folder of images to features on disk (resumable; failures listed)

# %%
src = out / "images"
src.mkdir()
for i in range(12):
    Image.fromarray(np.roll(a, 8 * i, axis=1)).save(src / f"img{i:02d}.jpg")
report = client.embed_folder(src, out / "features", images_per_request=4, concurrency=4)
print(report.summary())
rel, first = next(read_features(out / "features"))
print(rel, first.patch.shape)
print("pictures and features in", out)

# %%
client.close()
