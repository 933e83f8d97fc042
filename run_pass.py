import shutil, time, sys, os
from curate.manifest import Dataset
from pipelines.score import score
z = "/tmp/prof/data/zoo"
ds = Dataset("/tmp/prof/data/ds")
models = dict(clip=f"{z}/open_clip", tagger=f"wd14:{z}/wd14", watermark=f"owlv2:{z}/owlv2")
if len(sys.argv) > 1:
    models = {k: v for k, v in models.items() if k in sys.argv[1].split(",")}
for rep in range(2):
    for t in ("embeddings", "tags", "watermarks", "quality"):
        shutil.rmtree(ds.table_dir(t), ignore_errors=True)
    t0 = time.perf_counter()
    s = score(ds, **models, show_progress=False)
    print(rep, "pass", 600 / (time.perf_counter() - t0), "img/s", [x.ok for x in s])
