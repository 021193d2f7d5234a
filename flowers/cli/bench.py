"""`flowers bench`: every backend against native PyTorch/TensorFlow and the hardware."""

from __future__ import annotations

from pathlib import Path

import click

from flowers import paths
from flowers.bench import BenchSettings
from flowers.cli.options import default, out_option, parse_sizes


@click.command()
@click.option("--backends", default=",".join(default(BenchSettings, "backends")), show_default=True,
              help="Comma-separated backends, all measured in this one invocation.")
@click.option("--image-size", type=int, default=default(BenchSettings, "image_size"), show_default=True)
@click.option("--batch-size", type=int, default=default(BenchSettings, "batch_size"), show_default=True)
@click.option("--image-sizes", default="", metavar="N,N,...",
              help="Also time the forward pass at these image sides (e.g. 32,64,224): "
                   "small-image overhead as a figure, with its own target.")
@click.option("--contention", is_flag=True,
              help="Also time the forward pass beside a CPU-bound load on every core (bounded "
                   "busy processes, stopped afterwards): each backend's slowdown.")
@click.option("--memory", is_flag=True,
              help="Also measure the peak memory of forward and the train step (and of the native "
                   "twins), each in a fresh process.")
@click.option("--steps", type=int, default=default(BenchSettings, "steps"), show_default=True,
              help="Timed calls per figure (split over the rounds).")
@click.option("--rounds", type=int, default=default(BenchSettings, "rounds"), show_default=True,
              help="Interleaved rounds over the backends.")
@click.option("--warmup", type=int, default=default(BenchSettings, "warmup"), show_default=True,
              help="Untimed calls before a task is timed.")
@click.option("--e2e-epochs", type=int, default=default(BenchSettings, "e2e_epochs"), show_default=True,
              help="Epochs of the end-to-end baseline-shaped runs (0 skips them).")
@click.option("--e2e-images-per-class", type=int, default=default(BenchSettings, "e2e_images_per_class"),
              show_default=True,
              help="Training images per class in the end-to-end runs (half as many validate).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Class folder of real photos (default: $FLOWERS_PHOTOS, else "
                   "../shared/data/flowers12, if present; else synthetic images).")
@click.option("--variants", "variant_keys", default="all", show_default=True,
              help="Experiment keys whose other values get a variant each (a forward pass; "
                   "train.portable_random a train step): 'all', 'none' or a comma list of "
                   "model.data_format, train.jit_compile, train.dtype_policy, model.fold_batchnorm, "
                   "model.backend_kernel_layout, train.portable_random.")
@click.option("--backbone", default=default(BenchSettings, "backbone"), show_default=True,
              help="model.backbone of every measured model: a keras.applications name, "
                   "package.module:function or hub:PRESET (native twins: ResNet50 only).")
@out_option
def bench(backends: str, image_size: int, batch_size: int, image_sizes: str, contention: bool,
          memory: bool, steps: int,
          rounds: int, warmup: int, e2e_epochs: int, e2e_images_per_class: int,
          images: Path | None, variant_keys: str, backbone: str, out: Path | None) -> None:
    """Measure every backend against native PyTorch/TensorFlow and the hardware.

    Prints the table and writes OUT/bench/<device>/bench.json and bench.md; the last line printed
    is the bench.md path.
    """
    from flowers import bench as benchmark

    if images is None and paths.photos_dir().is_dir():
        images = paths.photos_dir()
    settings = benchmark.BenchSettings(
        backends=tuple(b.strip() for b in backends.split(",") if b.strip()),
        image_size=image_size, batch_size=batch_size, steps=steps, rounds=rounds, warmup=warmup,
        e2e_epochs=e2e_epochs, e2e_images_per_class=e2e_images_per_class,
        images=str(images.resolve()) if images else "",
        variants={"all": benchmark.VARIANT_KEYS, "none": ()}.get(
            variant_keys, tuple(k.strip() for k in variant_keys.split(",") if k.strip())),
        backbone=backbone.strip(), image_sizes=parse_sizes(image_sizes), contention=contention,
        memory=memory)
    results, out_dir = benchmark.run_bench(settings, paths.reports_root(out),
                                           progress=lambda line: click.echo(line, err=True))
    click.echo(benchmark.markdown(results))
    click.echo(str(out_dir / "bench.md"))
