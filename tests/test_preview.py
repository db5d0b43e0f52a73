"""src/preview.py draws the policy grid and the per-distortion sheet."""

import cv2

from conftest import run_script, tiny_overrides


def test_preview_writes_a_policy_grid_and_a_distortion_sheet(tmp_path):
    out = tmp_path / "pictures"
    result = run_script("preview.py", "augment=heavy", *tiny_overrides(tmp_path), f"preview.output_dir={out}",
                        "preview.images=3", "preview.versions=4", "preview.tile=40")
    assert result.returncode == 0, result.stderr[-2000:]
    grid = cv2.imread(str(out / "augment_heavy.png"))
    sheet = cv2.imread(str(out / "augment_heavy_distortions.png"))
    assert str(out / "augment_heavy.png") in result.stdout
    gap, title, caption = 4, 26, 22
    row_height = caption + 40 + 2 * gap
    assert grid.shape[:2] == (title + 3 * row_height, (1 + 4) * (40 + gap) + gap)  # 3 images: original + 4 draws
    assert sheet.shape[:2] == (title + 7 * row_height, 4 * (40 + gap) + gap)  # the 7 distortions of heavy
