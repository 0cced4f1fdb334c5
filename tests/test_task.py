"""Tasks as data: the TaskSpec and the Mechanism parse, check and travel as one type each; a site checks the task
against its own data before any privacy is charged; networks, losses and metrics follow the task."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from client.ingest import SiteDataset, SplitTensors
from client.site_config import default_site_config
from client.task_fit import TaskMismatch, class_map, fit_task
from client.task_metrics import classification_metrics, segmentation_metrics
from contract import Mechanism, MechanismError, TaskError, TaskSpec
from models import build_loss, build_task_model
from privacy.dpsgd import PrivateStep

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

THREE = TaskSpec(classes=("normal", "viral", "bacterial"))


# ---------------------------------------------------------------------------- the types
def test_task_round_trips_through_config_and_manifest() -> None:
    seg = TaskSpec(kind="segmentation", classes=(), labels=("anterior", "posterior"), spatial_dims=3,
                   size=(32, 48, 32), spacing_mm=(1.0, 1.0, 1.5), orientation="RAS", modalities=("MR",))
    for task in (TaskSpec(), THREE, seg):
        assert TaskSpec.from_config(task.to_config()) == task
        assert TaskSpec.from_manifest(task.to_manifest()) == task
    assert seg.num_outputs == 3 and THREE.num_outputs == 3 and TaskSpec().num_outputs == 2
    assert seg.to_manifest()["labels"] == ["anterior", "posterior"] and "classes" not in seg.to_manifest()


def test_metric_names_follow_the_task() -> None:
    binary = TaskSpec().metric_names()
    assert "val_auc" in binary and not any(m.startswith("val_recall_") for m in binary)  # binary keeps its set
    assert {"val_recall_normal", "val_recall_viral", "val_recall_bacterial", "val_auc"} <= set(THREE.metric_names())
    seg = TaskSpec(kind="segmentation", classes=(), labels=("a", "b"), spatial_dims=3, size=(16, 16, 16))
    assert {"val_dice", "val_dice_a", "val_dice_b"} <= set(seg.metric_names())


@pytest.mark.parametrize("config,match", [
    ({"task": "segmentation"}, "at least 1"),
    ({"task": "segmentation", "labels": "a", "classes": "x,y"}, "'classes' is for classification"),
    ({"classes": "a"}, "at least 2"),
    ({"classes": "a,b", "labels": "x"}, "'labels' is for segmentation"),
    ({"spatial-dims": 2, "spacing-mm": "1,1,1"}, "3D tasks only"),
    ({"spatial-dims": 3, "image-size": "32,32"}, "image-size"),
    ({"orientation": "XYZ", "spatial-dims": 3}, "orientation"),
    ({"loss": "dice_ce"}, "loss"),
    ({"in-channels": 0}, "in-channels"),
    ({"task": 3}, "'task' must be str"),
])
def test_bad_tasks_name_the_key(config: dict, match: str) -> None:
    with pytest.raises(TaskError, match=match):
        TaskSpec.from_config(config, where="run config")


def test_mechanism_round_trips_and_names_bad_keys() -> None:
    m = Mechanism(noise_multiplier=1.5, clip_norm=2.0, sample_rate=0.05, steps=30, accountant="prv")
    assert Mechanism.from_config(m.to_config()) == m and Mechanism.from_dict(m.to_dict()) == m
    assert Mechanism.from_record({**m.to_record(), "accountant": "prv"}) == m
    assert m.charge() == (1.5, 0.05, 30) and Mechanism(dp=False).charge()[0] == 0.0
    for bad, key in [(dict(noise_multiplier=float("nan")), "noise-multiplier"), (dict(steps=0), "local-steps"),
                     (dict(sample_rate=0.0), "sample-rate"), (dict(clip_norm=0.0), "clip-norm"),
                     (dict(accountant="gdp"), "accountant")]:
        with pytest.raises(MechanismError, match=key):
            Mechanism(**bad).check()
    with pytest.raises(ValueError, match="'local-steps' must be int"):
        Mechanism.from_config({"local-steps": "many"})


# ---------------------------------------------------------------------------- the site's check
def _site(tmp_path, classes=None, n=12, labels=None, modality="CR") -> tuple:
    cfg = dataclasses.replace(default_site_config(tmp_path, None, state_dir=tmp_path / "state"), classes=classes)
    lab = torch.tensor(labels if labels is not None else [i % 2 for i in range(n)], dtype=torch.int64)
    split = SplitTensors(torch.rand(len(lab), 1, 28, 28), lab, torch.arange(len(lab)))
    data = SiteDataset(train=split, val=split, report={"used": [{"modality": modality}]})
    return cfg, data


def test_site_classes_map_by_name_whatever_their_order(tmp_path) -> None:
    cfg, data = _site(tmp_path, classes=("bacterial", "normal"), labels=[0, 1, 1, 0])
    fitted = fit_task(THREE, cfg, data)
    assert fitted.train.labels.tolist() == [2, 0, 0, 2]  # site's "bacterial"=0 is the task's index 2


def test_a_site_class_the_task_lacks_is_a_task_mismatch(tmp_path) -> None:
    cfg, data = _site(tmp_path, classes=("normal", "pneumonia", "covid"), labels=[0, 1, 2])
    with pytest.raises(TaskMismatch, match="class\\(es\\) covid that the run's task does not have"):
        fit_task(TaskSpec(), cfg, data)
    # integer labels beyond the task's classes: the same refusal, with what to do
    cfg, data = _site(tmp_path, labels=[0, 1, 2])
    with pytest.raises(TaskMismatch, match="class index 2 but the run's task has 2 classes") as err:
        fit_task(TaskSpec(), cfg, data)
    assert err.value.code == "TASK_MISMATCH"
    assert class_map(THREE, None, {0, 1, 2}).tolist() == [0, 1, 2]


def test_kind_dimensions_channels_and_modality_must_fit(tmp_path) -> None:
    cfg, data = _site(tmp_path)
    seg = TaskSpec(kind="segmentation", classes=(), labels=("a",), spatial_dims=2)
    with pytest.raises(TaskMismatch, match="task is segmentation but this site's data is labelled for classification"):
        fit_task(seg, cfg, data)
    with pytest.raises(TaskMismatch, match="3D but this site holds 2D images"):
        fit_task(TaskSpec(spatial_dims=3, size=(16, 16, 16)), cfg, data)
    with pytest.raises(TaskMismatch, match="3 input channel"):
        fit_task(TaskSpec(in_channels=3), cfg, data)
    with pytest.raises(TaskMismatch, match="modality CR but the run's task is for MR"):
        fit_task(TaskSpec(modalities=("MR",)), cfg, data)
    assert fit_task(TaskSpec(modalities=("CR", "DX")), cfg, data).train.labels.tolist() == data.train.labels.tolist()


# ---------------------------------------------------------------------------- networks, losses, metrics
def test_the_factory_builds_from_the_task_and_refuses_the_wrong_kind() -> None:
    assert build_task_model("atollnet", THREE)(torch.rand(2, 1, 28, 28)).shape == (2, 3)
    seg = TaskSpec(kind="segmentation", classes=(), labels=("a", "b"), spatial_dims=3, size=(16, 16, 16))
    assert build_task_model("basicunet", seg)(torch.rand(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    with pytest.raises(ValueError, match="classification network; a segmentation task needs one of basicunet"):
        build_task_model("atollnet", seg)
    with pytest.raises(ValueError, match="segmentation network"):
        build_task_model("basicunet", THREE)


@pytest.mark.parametrize("loss", ["dice_ce", "dice_ce_fg"])
def test_segmentation_loss_is_a_sum_of_per_patient_losses_and_clips_exactly(loss: str) -> None:
    """Per-sample clipping needs sum_i loss_i: the batch loss equals the sum of single-example losses, and Atoll's
    fast clipping gives the clipped sum Opacus' hooks give (no noise), so sensitivity stays one clip bound."""
    torch.manual_seed(0)
    task = TaskSpec(kind="segmentation", classes=(), labels=("a", "b"), spatial_dims=2, size=(16, 16), loss=loss)
    criterion = build_loss(task)
    model = build_task_model("basicunet", task)
    x, y = torch.rand(3, 1, 16, 16), torch.randint(0, 3, (3, 16, 16))
    whole = criterion("sum")(model(x), y)
    parts = sum(criterion("sum")(model(x[i:i + 1]), y[i:i + 1]) for i in range(3))
    assert torch.allclose(whole, parts, rtol=1e-5)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for mode in ("bk", "hooks"):
        model.load_state_dict(init)
        step = PrivateStep(model, torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0),
                           Mechanism(noise_multiplier=0.0, clip_norm=0.05, sample_rate=0.5, dp=True),
                           expected_batch_size=3, grad_sample_mode=mode, criterion=criterion)
        step.step(x, y)
        step.close()
        out[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(out["bk"], out["hooks"], atol=1e-5)
    moved = out["bk"] - torch.cat([init[k].flatten() for k, _ in model.named_parameters()])
    # lr 1, no noise: the step is (sum of 3 clipped per-patient gradients) / 3, so 0 < ||step|| <= C
    assert 0 < float(moved.norm()) <= 0.05 + 1e-6


def test_multiclass_metrics_report_recall_per_class_and_macro_auc() -> None:
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3]

    labels = torch.tensor([0, 1, 2, 2])
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    m = classification_metrics(THREE, Fixed(), logits.view(4, 1, 1, 3), labels, torch.device("cpu"))
    assert m["val_recall_normal"] == 1.0 and m["val_recall_viral"] == 1.0 and m["val_recall_bacterial"] == 0.5
    assert m["val_accuracy"] == 0.75 and 0.5 < m["val_auc"] <= 1.0


def test_segmentation_metrics_are_dice_per_label() -> None:
    task = TaskSpec(kind="segmentation", classes=(), labels=("a", "b"), spatial_dims=2, size=(8, 8))

    class Oracle(torch.nn.Module):
        def forward(self, x):  # x holds the label map: a perfect prediction of labels 0, 1; label 2 never predicted
            y = (x[:, 0].long() == 1).long()
            return torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float() * 10

    y = torch.zeros(2, 8, 8, dtype=torch.int64)
    y[:, :4] = 1
    y[:, 6:] = 2
    m = segmentation_metrics(task, Oracle(), y.unsqueeze(1).float(), y, torch.device("cpu"))
    assert m["val_dice_a"] == pytest.approx(1.0) and m["val_dice_b"] == pytest.approx(0.0)
    assert m["val_dice"] == pytest.approx(0.5) and m["n"] == 2
