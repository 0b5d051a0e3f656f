"""bench.py pipeline (benchmarks/pipeline.py): both pipelines deliver normalised 224-style batches of the generated
JPEGs, and it reports their rates (a smoke test on a few tiny crops; the measurement is in docs/BENCHMARKS.md)."""

from benchmarks import pipeline as pipeline_bench


def test_both_pipelines_run_and_are_reported(capsys):
    results = pipeline_bench.main(["--images", "8", "--workers", "1", "--batch_size", "4", "--repeats", "1",
                                   "--image_size", "32"])
    assert set(results) == {"conventional", "streaming"}
    assert all(r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0 for r in results.values())
    out = capsys.readouterr().out
    assert "streaming / conventional:" in out and "load average" in out


def test_generated_jpegs_have_imagenets_size(tmp_path):
    kb = pipeline_bench.make_jpegs(tmp_path, 12)
    assert 90 <= kb <= 140
    assert len(list((tmp_path / "train").rglob("*.jpg"))) == 12
