import json

import bench


def test_bench_runs_on_cpu_and_writes_its_json(tmp_path):
    result = bench.main(bench.parse_args(
        ["--images", "6", "--loader-passes", "1", "--image-px", "120", "90", "--steps", "1", "--out-dim", "256", "--local-crops", "2",
         "--img-size", "32", "--bs", "4", "--workers", "0", "--device", "cpu", "--out", str(tmp_path)]))
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert on_disk["loader_speedup"] == result["loader_speedup"] > 0
    assert on_disk["cass_dino_time_ratio"] == result["cass_dino_time_ratio"] > 0
    ratio = (1 / result["cass_ips"]) / (1 / result["dino_cnn_ips"] + 1 / result["dino_vit_ips"])
    assert result["cass_dino_time_ratio"] == ratio
    assert result["cass_gflop_per_image"] > 0 and 0 < result["fraction_of_peak"]
    assert len(list((tmp_path / "jpegs").rglob("*.jpg"))) == 6
