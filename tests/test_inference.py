"""The model as a product: predict.py on a user's files, export.py to ONNX and int8, on real photographs.

One tiny training on crops of the photographs scikit-learn and matplotlib install (not images we
drew); what predict and export say is checked against what the training itself measured (its test
accuracy, logged by Lightning) and against onnxruntime and numpy run here.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from cnnlab.data.augment import eval_transform
from cnnlab.data.datamodule import to_tensor
from cnnlab.training.module import ImageClassifier
from conftest import photographs, run_script, wait_for_http

pytestmark = pytest.mark.slow

CROPS = 24  # per class
DATA = ["data=imagefolder", "data.source.stored_size=48", "data.image_size=32", "data.num_workers=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, the training's run folder, its MLflow run, the images folder): 3 classes of photo crops."""
    root = tmp_path_factory.mktemp("product")
    images, rng = root / "images", np.random.default_rng(0)
    for name, photo in photographs().items():
        image = Image.open(photo).convert("RGB")
        (images / name).mkdir(parents=True)
        for i in range(CROPS):
            side = int(rng.integers(120, min(image.size)))
            x, y = int(rng.integers(0, image.width - side)), int(rng.integers(0, image.height - side))
            image.crop((x, y, x + side, y + side)).save(images / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    result = run_script("train.py", f"paths.root_dir={root}", *DATA, f"data.source.root={images}",
                        "data.source.val_fraction=0.2", "data.source.test_fraction=0.25", "trainer.max_epochs=4",
                        f"hydra.run.dir={root}/run")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    return root, root / "run", run, images


def split_files(trained) -> tuple[list[Path], Path]:
    """The test split's files, in the cache's order."""
    root, _, _, images = trained
    [cache] = (root / "data").glob("imagefolder-*")
    meta = json.loads((cache / "meta.json").read_text())
    return [images / row["file"] for row in meta["files"] if row["split"] == "test"], cache


def predict(root: Path, name: str, *args: str):
    """predict.py with ``args`` into root/predict/<name>: (its result, its predictions.json, the folder)."""
    folder = root / "predict" / name
    result = run_script("predict.py", *args, f"paths.root_dir={root}", f"hydra.run.dir={folder}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((folder / "predictions.json").read_text()), folder


def test_predict_on_a_folder_scores_what_evaluation_scores_and_lists_the_bad_files_at_the_end(trained):
    root, run_folder, run, _ = trained
    files, cache = split_files(trained)
    inbox = root / "inbox"
    (inbox / "nested").mkdir(parents=True)
    for i, path in enumerate(files):  # the test split's photos, some in a sub-folder, renamed as a user would
        shutil.copyfile(path, (inbox / "nested" if i % 3 == 0 else inbox) / f"{i:03d}{path.suffix}")
    (inbox / "notes.txt").write_text("not an image, and not an image name: ignored")
    (inbox / "zz_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (inbox / "zz_text.png").write_text("a text file named like an image")

    result, output, folder = predict(root, "folder", f"ckpt={run_folder}/checkpoints/best.ckpt", f"images={inbox}",
                                     "top_k=2", "shown=3")
    tail = result.stdout.splitlines()[-4:]  # the bad files come last, before where the outputs are
    assert tail[0] == "2 files could not be read:" and tail[1].startswith(f"  {inbox}/zz_broken.jpg: "), tail
    assert tail[2].startswith(f"  {inbox}/zz_text.png: UnidentifiedImageError"), tail
    assert f"... and {len(files) - 3} more (all in predictions.csv)" in result.stdout

    rows = {Path(row["path"]).name: row["top_k"] for row in output["predictions"]}
    assert len(rows) == len(files) and len(output["unreadable"]) == 2
    csv_lines = (folder / "predictions.csv").read_text().splitlines()
    assert csv_lines[0] == "path,class_1,probability_1,class_2,probability_2" and len(csv_lines) == len(files) + 1

    # the same pixels as the test step: the module on the cached test images through the evaluation transform
    module = ImageClassifier.load_from_checkpoint(run_folder / "checkpoints" / "best.ckpt").eval()
    cached = np.load(cache / "test_images.npy")
    labels = np.load(cache / "test_labels.npy")
    batch = torch.stack([to_tensor(eval_transform(32)(image=image)["image"]) for image in cached])
    with torch.no_grad():
        expected = module(batch).softmax(dim=1).numpy()
    for i, path in enumerate(files):
        top = rows[f"{i:03d}{path.suffix}"]
        assert [t["class"] for t in top] == [module.classes[c] for c in np.argsort(-expected[i])[:2]]
        assert [t["probability"] for t in top] == pytest.approx(np.sort(expected[i])[::-1][:2], abs=1e-5)
    accuracy = np.mean([rows[f"{i:03d}{p.suffix}"][0]["class"] == module.classes[labels[i]] for i, p in enumerate(files)])
    assert accuracy == pytest.approx(run.data.metrics["test/acc"])  # what the training measured itself


def test_predict_takes_a_run_reference_a_single_file_and_test_time_views(trained):
    root, run_folder, run, _ = trained
    [file] = split_files(trained)[0][:1]
    plain, from_run, with_flip = (predict(root, name, ckpt, f"images={file}", "top_k=3", *tta)[1]["predictions"]
                                  for name, ckpt, *tta in [("file", f"ckpt={run_folder}/checkpoints/best.ckpt"),
                                                           ("run", f"ckpt=runs:/{run.info.run_id}"),
                                                           ("flip", f"ckpt=runs:/{run.info.run_id}", "tta=flip")])
    assert plain == from_run and len(plain[0]["top_k"]) == 3
    assert sum(t["probability"] for t in with_flip[0]["top_k"]) == pytest.approx(1, abs=1e-5)
    assert with_flip[0]["top_k"] != plain[0]["top_k"]  # the mirrored view is averaged in


def test_export_checks_scores_quantizes_logs_and_predicts_like_the_checkpoint(trained):
    root, run_folder, run, images = trained
    files, cache = split_files(trained)
    result = run_script("export.py", f"ckpt={run_folder}/checkpoints/best.ckpt", "quantize=int8", *DATA,
                        f"data.source.root={images}", "data.source.val_fraction=0.2", "data.source.test_fraction=0.25",
                        f"paths.root_dir={root}", f"hydra.run.dir={root}/export")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((root / "export" / "export.json").read_text())
    assert summary["max_abs_difference"] <= 1e-4
    # fp32 ONNX on the test split scores exactly what the training's own test step measured
    assert summary["test_acc"]["onnx"] == pytest.approx(run.data.metrics["test/acc"])

    # int8: its accuracy is what onnxruntime's int8 model gives here, scored with numpy
    import onnxruntime as ort
    session = ort.InferenceSession(str(root / "export" / "model.int8.onnx"))
    batch = np.stack([to_tensor(eval_transform(32)(image=image)["image"]).numpy()
                      for image in np.load(cache / "test_images.npy")])
    [logits] = session.run(None, {"images": batch})
    assert summary["test_acc"]["int8"] == pytest.approx(np.mean(logits.argmax(1) == np.load(cache / "test_labels.npy")))
    ops = {node.op_type for node in onnx.load(str(root / "export" / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "ConvInteger" not in ops  # static QDQ, not dynamic

    meta = {p.key: p.value for p in onnx.load(str(root / "export" / "model.onnx")).metadata_props}
    assert json.loads(meta["cnnlab.classes"]) == ["china", "flower", "hopper"]
    assert (meta["cnnlab.image_size"], meta["cnnlab.stored_size"]) == ("32", "48")
    assert json.loads(meta["cnnlab.mean"]) == [0.485, 0.456, 0.406] and meta["cnnlab.train_run_id"] == run.info.run_id
    graph_input = onnx.load(str(root / "export" / "model.onnx")).graph.input[0]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert logged == {"export/model.onnx", "export/model.int8.onnx", "export/export.json"}
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["export/int8/test_acc"] == summary["test_acc"]["int8"]

    # predict.py runs the exported file, giving the checkpoint's probabilities
    inbox = root / "onnx_inbox"
    inbox.mkdir()
    for path in files[:6]:
        shutil.copyfile(path, inbox / path.name)
    by_checkpoint, by_onnx = (predict(root, name, f"ckpt={model}", f"images={inbox}")[1]["predictions"]
                              for name, model in [("ckpt", f"{run_folder}/checkpoints/best.ckpt"),
                                                  ("onnx", f"{root}/export/model.onnx")])
    for a, b in zip(by_checkpoint, by_onnx):
        assert [t["class"] for t in a["top_k"]] == [t["class"] for t in b["top_k"]]
        assert [t["probability"] for t in a["top_k"]] == pytest.approx([t["probability"] for t in b["top_k"]], abs=1e-4)


def test_a_folder_without_images_is_one_line(trained, tmp_path):
    root, run_folder, _, _ = trained
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    result = run_script("predict.py", f"ckpt={run_folder}/checkpoints/best.ckpt", f"images={tmp_path}/empty",
                        f"paths.root_dir={root}")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        f"Error: no image files (.bmp, .jpeg, .jpg, .png, .webp) in {tmp_path}/empty"), result.stderr[-2000:]


def mlflow_predictions(table) -> list[tuple[str, list[float]]]:
    return [(row["class"], list(row["probabilities"])) for row in table]


def test_the_training_registered_its_model_and_the_pyfunc_predicts_like_predict_py(trained):
    import mlflow
    import pandas as pd

    root, run_folder, run, _ = trained
    files = split_files(trained)[0][:5]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    [version] = client.search_model_versions("name='cnnlab-resnet_small'")
    assert version.run_id == run.info.run_id and int(version.version) == 1

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    model = mlflow.pyfunc.load_model("models:/cnnlab-resnet_small/1")
    assert [c.name for c in model.metadata.signature.inputs] == ["image"]
    assert model.metadata.metadata["classes"] == ["china", "flower", "hopper"]
    table = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]})).to_dict("records")

    inbox = root / "pyfunc_inbox"
    inbox.mkdir()
    for i, path in enumerate(files):
        shutil.copyfile(path, inbox / f"{i}{path.suffix}")
    _, output, _ = predict(root, "pyfunc", f"ckpt={run_folder}/checkpoints/best.ckpt", f"images={inbox}", "top_k=3")
    by_name = {Path(row["path"]).name: {t["class"]: t["probability"] for t in row["top_k"]} for row in output["predictions"]}
    for i, (path, (best, probabilities)) in enumerate(zip(files, mlflow_predictions(table))):
        expected = by_name[f"{i}{path.suffix}"]
        assert best == max(expected, key=expected.get)
        assert probabilities == pytest.approx([expected[c] for c in ("china", "flower", "hopper")], abs=1e-5)


def test_mlflow_models_serve_answers_on_image_files(trained, tmp_path):
    """A real `mlflow models serve` of the registered model on 127.0.0.1 (offline: --env-manager local)."""
    import base64
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    root, _, _, _ = trained
    files = split_files(trained)[0][:3]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environment = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "NO_ALBUMENTATIONS_UPDATE": "1",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "serve.log"
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                               "models:/cnnlab-resnet_small/1", "--env-manager", "local", "-h", "127.0.0.1", "-p",
                               str(port)], env=environment, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, log)
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(f.read_bytes()).decode()] for f in files]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    import mlflow
    import pandas as pd
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    local = mlflow.pyfunc.load_model("models:/cnnlab-resnet_small/1").predict(
        pd.DataFrame({"image": [f.read_bytes() for f in files]})).to_dict("records")
    assert [row["class"] for row in answer] == [row["class"] for row in local]
    for served, loaded in zip(mlflow_predictions(answer), mlflow_predictions(local)):
        assert served[1] == pytest.approx(loaded[1], abs=1e-6)


def test_a_checkpoint_that_does_not_say_its_image_size_is_one_line(trained, tmp_path):
    """Checkpoints from before predict.py record no image size: refused, not guessed."""
    root, run_folder, _, images = trained
    checkpoint = torch.load(run_folder / "checkpoints" / "best.ckpt", weights_only=True)
    del checkpoint["hyper_parameters"]["image_size"], checkpoint["hyper_parameters"]["stored_size"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    result = run_script("predict.py", f"ckpt={tmp_path}/old.ckpt", f"images={images}", f"paths.root_dir={root}")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"Error: {tmp_path}/old.ckpt does not say its image size (a training older than predict.py): train it "
        "again, or score it with src/evaluate.py on its prepared test split"), result.stderr[-2000:]
