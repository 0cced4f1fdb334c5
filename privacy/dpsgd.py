"""Local training at a site: plain minibatch training or patient-level DP-SGD through Opacus.

Unit of privacy: the PATIENT (DESIGN.md). The site guarantees (epsilon, delta)-DP with respect to adding or
removing *all* images of one patient. The mechanism, per step:

1. **Poisson-sample patients**: every patient of the training split is included independently with
   probability ``q = Mechanism.sample_rate`` (fresh randomness each step; the batch may be empty).
2. **One image per sampled patient**: for each sampled patient one of their images is drawn uniformly at
   random. A batch therefore holds at most one example per patient, so Opacus' *per-sample* clipping is
   exactly *per-patient* clipping.
3. **Clip and noise (Opacus)**: each example's gradient is clipped to L2 norm ``C = clip_norm`` with
   Opacus' factor ``min(1, C / (||g_i|| + 1e-6))``, the clipped gradients are summed, Opacus' optimizer adds
   Gaussian noise N(0, (sigma*C)^2 I) with ``sigma = noise_multiplier`` and divides by the expected batch
   size ``q*P`` (a fixed constant, i.e. post-processing).

Sensitivity: adding or removing one patient adds or removes at most one clipped term of norm <= C in the
pre-noise sum, however many images the patient has (tests/test_dpsgd.py checks this on the real step and
shows that sampling images instead of patients breaks it). Together with Poisson sampling of patients at
rate q this is the sampled Gaussian mechanism that Opacus' RDP/PRV accountants count with
``(noise_multiplier, sample_rate, steps)`` — which is what ``LocalTrainResult`` returns to the caller; this
module does no accounting itself.

Randomness: patient sampling, image choice and noise come from torch generators seeded from OS entropy
(``secrets``) on every call — never from a caller's seed, which is usually derived from run/round values the
server knows and would let it recompute (and subtract) the noise and see which patients were sampled;
``reproducible_dp=True`` exists for tests and benchmarks only. (Opacus' ``secure_mode`` needs torchcsprng,
which is not installed; the Mersenne-Twister noise is not hardened against floating-point attacks.)

Empty Poisson batches still take a step: zero per-sample gradients go through Opacus' optimizer, which
adds pure noise (skipping the step would reveal that the batch was empty).

How the per-sample norms and the clipped sum are computed (``grad_sample_mode``; all give the same clipped
sum as Opacus' stock ``hooks`` mode to float precision — tests/test_dpsgd.py — and differ only in cost, see
bench/dp_overhead.py):

* ``bk`` (Atoll's default through ``auto`` for Conv/Linear/GroupNorm networks; ``hooks`` otherwise):
  ``privacy.fast_clipping`` — per-sample norms (ghost norms where cheaper, "mixed ghost clipping") and the
  clipped sum written to ``p.grad`` in ONE backward pass (book-keeping), then Opacus'
  ``DPOptimizerFastGradientClipping`` adds the noise (``privacy.inplace_noise``: its step with the noise added
  in place, bit-identical).
* ``fast``: Opacus hooks + ``DPOptimizer`` (Opacus clips the per-sample gradients), with the conv per-sample
  gradients from ``privacy.ghost_conv`` and no wasted summed weight gradient.
* ``hooks`` / ``functorch`` / ``ghost``: stock Opacus; ``ghost-conv``: Opacus' two-backward ghost clipping
  with ``privacy.ghost_conv``'s conv norms.

Training-recipe options that keep the mechanism (README "Run config"; each tested in tests/test_dpsgd.py):

* **Augmentation multiplicity** ``K = augment_multiplicity`` (De et al. 2022): the ONE image drawn for a sampled
  patient becomes K random views (``privacy.augment``, randomness from the DP generator); their per-sample
  gradients are averaged BEFORE Opacus clips, so the patient still adds one clipped term of norm <= C.
  This needs materialised per-sample gradients (``p.grad_sample``), so K > 1 runs on ``hooks`` (what ``auto``
  picks), ``fast`` or ``functorch``; ``bk`` and the ghost modes only ever see per-view norms and would clip
  each view separately (K terms of norm C per patient), so they refuse K > 1.
* **EMA of the iterates** ``ema_decay`` (``privacy.weight_ema``): the site releases the moving average of its
  DP iterates within the round — post-processing, no extra charge.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from contract.mechanism import Mechanism
from contract.recipe import check_decay, check_multiplicity

from . import adaptive_clip, fast_clipping
from .augment import augment_views, average_views
from .ghost_conv import fast_layers
from .weight_ema import IterateEMA

GRAD_SAMPLE_MODES: tuple[str, ...] = ("bk", "fast", "hooks", "functorch", "ghost", "ghost-conv")
DEFAULT_GRAD_SAMPLE_MODE = "auto"  # "bk" when every trainable layer is Conv/Linear/GroupNorm, else "hooks"

# Local optimizer. SGD with momentum is the default: Adam divides each coordinate by its running RMS, which
# under DP-SGD is dominated by the noise, so it rescales the update by the noise rather than the signal (and
# on the demo consortium Adam-trained DP models stayed at the majority class; README "Benchmarks").
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
DEFAULT_OPTIMIZER = "sgd"
DEFAULT_MOMENTUM = 0.9


#: Modes that materialise per-sample gradients, so K augmented views can be averaged before clipping.
MULTIPLICITY_MODES: tuple[str, ...] = ("hooks", "fast", "functorch")


def resolve_grad_sample_mode(model: nn.Module, mode: str = DEFAULT_GRAD_SAMPLE_MODE,
                             augment_multiplicity: int = 1) -> str:
    """``auto`` -> the fastest mode that can clip ``model`` exactly (``bk``, else Opacus' ``hooks``; ``hooks``
    whenever ``augment_multiplicity > 1``, see the module docstring)."""
    if mode == "auto":
        return "hooks" if augment_multiplicity > 1 or fast_clipping.unsupported_layers(model) else "bk"
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be 'auto' or one of {GRAD_SAMPLE_MODES}, got {mode!r}")
    if augment_multiplicity > 1 and mode not in MULTIPLICITY_MODES:
        raise ValueError(f"grad_sample_mode {mode!r} cannot average augmented views before clipping (it never holds "
                         f"per-sample gradients); with augment_multiplicity > 1 use 'auto' or one of "
                         f"{MULTIPLICITY_MODES}")
    return mode


class TrainData(Protocol):
    """What ``train_local`` needs (``client.ingest.SplitTensors`` fits)."""

    images: torch.Tensor  # float [N, C, *spatial]
    labels: torch.Tensor  # int64 [N]
    patients: torch.Tensor  # int64 [N], 0..P-1


#: ``criterion(reduction)`` -> a loss module whose ``"sum"`` is the sum of per-example losses (the task's loss,
#: from ``models.build_loss``); per-sample clipping needs that sum, not a batch statistic.
Criterion = Callable[[str], nn.Module]


def cross_entropy(reduction: str) -> nn.Module:
    """The default criterion: classification cross-entropy."""
    return nn.CrossEntropyLoss(reduction=reduction)


def check_mechanism(mechanism: Mechanism) -> Mechanism:
    """A mechanism this trainer can run: raise ``ValueError`` naming the bad field otherwise."""
    if not isinstance(mechanism, Mechanism):
        raise ValueError(f"train_local needs a contract.Mechanism, got {type(mechanism).__name__}")
    return mechanism.check("DP mechanism")


@dataclass
class LocalTrainResult:
    """What happened: ``steps`` actually taken (what the accountant must charge), mean training loss over the
    steps' non-empty batches, ``num_examples`` = training images available, wall-clock ``seconds``, the
    ``mechanism`` run, and ``empty_steps``: how many DP steps drew an empty Poisson batch (noise only).

    When every step was empty ``train_loss`` is NaN: there was no batch to take a loss of. The update is still a
    valid DP release (the steps were taken and must be charged); the caller releases it and names the missing
    loss (``client.app``: reason ``EMPTY_BATCHES``) instead of dropping the reply."""

    steps: int
    train_loss: float
    num_examples: int
    seconds: float
    mechanism: Mechanism
    empty_steps: int = 0

    @property
    def all_batches_empty(self) -> bool:
        """No step saw a patient: the loss is undefined, the noised update is not."""
        return self.steps > 0 and self.empty_steps == self.steps


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``cuda``/``cuda:N`` when requested and available, else cpu (``auto`` picks cuda if present)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


def _check_data(data: TrainData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels, patients = data.images, data.labels, data.patients
    if not isinstance(images, torch.Tensor) or images.ndim < 3 or not images.is_floating_point():
        raise ValueError("training data: images must be a float tensor [N, C, *spatial]")
    n = images.shape[0]
    if n == 0:
        raise ValueError("training data: no images")
    if not isinstance(patients, torch.Tensor) or patients.shape != (n,) or patients.dtype != torch.int64:
        raise ValueError(f"training data: patients must be an int64 tensor of shape [{n}]")
    # classification: one label per image [N]; segmentation: one label map per image [N, *spatial]
    if not isinstance(labels, torch.Tensor) or labels.ndim < 1 or labels.shape[0] != n or labels.dtype != torch.int64:
        raise ValueError(f"training data: labels must be an int64 tensor of shape [{n}] or [{n}, *spatial]")
    if int(patients.min()) < 0:
        raise ValueError("training data: patients must be indices 0..P-1")
    if int(labels.min()) < 0:
        raise ValueError("training data: labels must be >= 0")
    return images, labels, patients


class PatientSampler:
    """Poisson sampling of patients, then one uniformly random image per sampled patient.

    Patients are ``0..P-1`` with ``P = patients.max() + 1``; a patient index without images is never
    selected as an image, which only lowers the real batch (never raises a patient's contribution).
    """

    def __init__(self, patients: torch.Tensor, sample_rate: float, generator: torch.Generator) -> None:
        patients = patients.cpu()
        self.num_patients = int(patients.max()) + 1
        self.order = torch.argsort(patients, stable=True)
        self.counts = torch.bincount(patients, minlength=self.num_patients)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.sample_rate = sample_rate
        self.generator = generator

    def sample(self) -> torch.Tensor:
        """Image indices of one step's batch (at most one per patient; possibly empty)."""
        g = self.generator
        chosen = torch.rand(self.num_patients, generator=g) < self.sample_rate
        chosen &= self.counts > 0
        pats = torch.nonzero(chosen).flatten()
        offset = (torch.rand(len(pats), generator=g) * self.counts[pats]).long()
        offset = torch.minimum(offset, self.counts[pats] - 1)
        return self.order[self.starts[pats] + offset]


class PrivateStep:
    """One DP-SGD step through Opacus for a chosen per-sample-gradient mode.

    ``step(x, y)`` runs forward, backward, Opacus' clipping at C and Gaussian noise sigma*C, and the
    optimizer update for the batch ``(x, y)`` (an empty batch still gets the noise). ``close()`` removes every
    Opacus hook and attribute and restores the model's classes. The bench uses this exact object, so the
    timings it reports are those of training.

    Modes: ``"auto"`` or one of ``GRAD_SAMPLE_MODES`` (module docstring). ``augment_multiplicity = K > 1``
    expands each image into K views drawn with ``augment_generator`` (a fresh OS-entropy one when None) and
    averages their per-sample gradients before Opacus clips.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dp: Mechanism,
        *,
        expected_batch_size: int,
        grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
        generator: torch.Generator | None = None,
        criterion: Criterion = cross_entropy,
        augment_multiplicity: int = 1,
        augment_generator: torch.Generator | None = None,
    ) -> None:
        self.k = check_multiplicity(augment_multiplicity)
        if dp.adaptive_clip:  # its own route: per-sample gradients into privacy.adaptive_clip's optimizer
            grad_sample_mode = adaptive_clip.resolve_mode(grad_sample_mode)
        grad_sample_mode = resolve_grad_sample_mode(model, grad_sample_mode, self.k)
        if self.k > 1 and augment_generator is None:
            augment_generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.augment_generator = augment_generator
        self.mode = grad_sample_mode
        self.model = model
        self._fast_ctx = None
        self.bk = grad_sample_mode == "bk"
        if self.bk:
            bad = fast_clipping.unsupported_layers(model)
            if bad:
                raise ValueError(f"grad_sample_mode 'bk' does not support layers: {', '.join(bad)}; use 'hooks'")
        if grad_sample_mode in ("fast", "ghost-conv"):
            self._fast_ctx = fast_layers(model, skip_weight_grad=grad_sample_mode == "fast")
            self._fast_ctx.__enter__()
        self.ghost = grad_sample_mode in ("ghost", "ghost-conv")
        self.grad_mode = self.ghost or self.bk  # optimizer takes an already clipped p.grad (no grad_sample)
        if self.bk:
            # Book-keeping (privacy.fast_clipping): one backward writes sum_i min(1, C/||g_i||) g_i into p.grad;
            # Opacus' FGC optimizer (in place: privacy.inplace_noise) adds N(0, (sigma C)^2) and divides by
            # expected_batch_size.
            self.gsm, self.optimizer = fast_clipping.make_private_bk(
                model, optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
                expected_batch_size=expected_batch_size, generator=generator,
            )
            self.loss_fn = criterion("sum")
        elif self.ghost:
            # Opacus' ghost clipping: every piece must agree on "mean"; the second backward sums the
            # re-weighted per-sample losses and the optimizer divides the noisy sum by expected_batch_size.
            self.gsm = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="mean", max_grad_norm=dp.clip_norm, use_ghost_clipping=True
            )
            self.optimizer = DPOptimizerFastGradientClipping(
                optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
                expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator,
            )
            self.loss_fn = DPLossFastGradientClipping(
                self.gsm, self.optimizer, criterion("mean"), loss_reduction="mean"
            )
        else:
            # Loss = SUM over the batch, so per-sample gradients are true per-example gradients; the
            # optimizer divides the clipped, noised sum by expected_batch_size (a constant: post-processing).
            self.gsm = GradSampleModule(
                model, batch_first=True, loss_reduction="sum", strict=True,
                force_functorch=grad_sample_mode == "functorch",
            )
            self.optimizer = adaptive_clip.make_optimizer(
                optimizer, dp, expected_batch_size=expected_batch_size, generator=generator,
            ) if dp.adaptive_clip else DPOptimizer(
                optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
                expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator,
            )
            self.loss_fn = criterion("sum")

    def _empty_batch(self) -> None:
        """No sampled patient: a zero contribution goes through Opacus, which still adds the noise."""
        if self.bk:
            self.gsm.zero_clipped_grads()
            return
        for p in self.optimizer.params:
            if self.grad_mode:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """One private step; returns the batch's mean loss (None for an empty batch)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_value: float | None = None
        if len(x) == 0:
            self._empty_batch()
        elif self.k > 1:
            # K views per image (rows b*K .. b*K+K-1); their per-sample gradients are averaged into one per
            # image BEFORE DPOptimizer clips: one clipped term per sampled patient (module docstring).
            views = augment_views(x, self.k, self.augment_generator)
            loss = self.loss_fn(self.gsm(views), y.repeat_interleave(self.k, dim=0))
            loss.backward()
            for p in self.optimizer.params:
                if getattr(p, "grad_sample", None) is not None:
                    p.grad_sample = average_views(p.grad_sample, self.k)
            loss_value = loss.item() / len(views)
        else:
            loss = self.loss_fn(self.gsm(x), y)
            if self.bk:
                self.gsm.clip_backward(loss)
            else:
                loss.backward()
            loss_value = loss.item() if self.ghost else loss.item() / len(x)
        self.optimizer.step()
        return loss_value

    def close(self) -> nn.Module:
        """Unwrap: no Opacus hooks/attributes left, original layer classes restored."""
        self.optimizer.zero_grad(set_to_none=True)
        self.gsm.to_standard_module()
        if self._fast_ctx is not None:
            self._fast_ctx.__exit__(None, None, None)
            self._fast_ctx = None
        for p in self.model.parameters():
            p.grad = None
        return self.model


def check_optimizer(name: str, momentum: float) -> None:
    """Raise ``ValueError`` naming the problem for an unknown optimizer or a momentum outside [0, 1)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if name == "adam" and momentum != DEFAULT_MOMENTUM:
        raise ValueError("momentum applies to optimizer 'sgd' only (Adam keeps its own betas)")


def make_optimizer(
    params, name: str = DEFAULT_OPTIMIZER, *, lr: float, momentum: float = DEFAULT_MOMENTUM
) -> torch.optim.Optimizer:
    """The local optimizer: ``sgd`` (heavy-ball ``momentum``) or ``adam`` (torch defaults otherwise)."""
    check_optimizer(name, momentum)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr)


def train_local(
    model: nn.Module,
    data: TrainData,
    mechanism: Mechanism,
    *,
    lr: float,
    device: torch.device | str,
    batch_size: int = 64,
    seed: int | None = None,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    reproducible_dp: bool = False,
    optimizer: str = DEFAULT_OPTIMIZER,
    momentum: float = DEFAULT_MOMENTUM,
    criterion: Criterion = cross_entropy,
    proximal_mu: float = 0.0,
    augment_multiplicity: int = 1,
    ema_decay: float = 0.0,
) -> LocalTrainResult:
    """Train ``model`` in place for exactly ``mechanism.steps`` optimizer steps.

    Parameters
    ----------
    model: the network (from ``models.build_model``); its weights are updated in place and it is left
        unwrapped (no Opacus hooks or attributes) on its original device.
    data: images [N, C, ...] float, labels [N] int64 (or [N, ...] label maps for segmentation), patients [N]
        int64 (0..P-1).
    mechanism: the round's :class:`~contract.mechanism.Mechanism`: ``steps`` optimizer steps (each one sampled
        batch; the accountant charges exactly these). ``dp=False``: plain minibatch training over images
        (shuffled epochs of ``batch_size``); otherwise patient-level DP-SGD (module docstring) with σ, C and q
        from the mechanism, and ``batch_size`` is ignored (the batch is ~ q * P).
    lr: learning rate of ``optimizer``.
    device: where to train; cuda falls back to cpu when unavailable.
    seed: makes the non-private path reproducible (shuffling). It does NOT drive the DP randomness unless
        ``reproducible_dp`` is set: whoever can recompute the noise can subtract it from the update, and whoever
        knows which patients were sampled voids the amplification the accountant counts on — and a seed is
        typically derived from run/round values the server knows.
    reproducible_dp: tests and benchmarks only — let ``seed`` also drive Poisson sampling, image choice and
        the Gaussian noise. Otherwise they come from OS entropy (``secrets``) on every call.
    grad_sample_mode: how per-sample norms / clipped sums are computed (``auto`` or ``GRAD_SAMPLE_MODES``);
        every mode is the same mechanism, only the cost differs.
    optimizer: ``"sgd"`` (default, with ``momentum``) or ``"adam"``; anything else is a ``ValueError``. Under DP
        the optimizer only post-processes the noised gradient, so it changes utility, never the privacy spent.
    momentum: SGD heavy-ball momentum in [0, 1) (default 0.9); the momentum buffer starts at zero every call.
    criterion: the task's loss (:data:`Criterion`); cross-entropy by default.
    proximal_mu: FedProx's proximal term (mu/2)||w - w_0||^2 towards the weights the call started from (the
        round's global model). It is applied as a decoupled step after each optimizer step,
        ``w <- w - lr * mu * (w - w_0)``: it depends on no patient's data, so it is post-processing of the
        DP-SGD update — every patient still contributes one clipped gradient per step, and the privacy charge is
        unchanged (tests/test_dpsgd.py). Putting it inside the clipped loss instead would spend part of every
        patient's clip bound on a data-free term.
    augment_multiplicity: K >= 1 random augmented views of every image a step uses (``privacy.augment``:
        2D flip + shift, 3D flips); under DP their per-sample gradients are averaged before clipping, so each
        sampled patient still contributes one clipped gradient (module docstring); without DP the loss is the
        mean over the views. Classification only (a label map would need the same transform). 1 = off.
    ema_decay: d in [0, 1): release the exponential moving average of the iterates of this call, starting from
        the weights it started from (``privacy.weight_ema``), instead of the last iterate. Post-processing of
        the DP iterates: the privacy charge is unchanged. 0 = off.
    """
    if isinstance(proximal_mu, bool) or not isinstance(proximal_mu, (int, float)) or not (
            math.isfinite(proximal_mu) and proximal_mu >= 0):
        raise ValueError(f"proximal_mu must be a finite number >= 0, got {proximal_mu!r}")
    check_mechanism(mechanism)
    check_multiplicity(augment_multiplicity)
    check_decay(ema_decay)
    steps = mechanism.steps
    dp = mechanism if mechanism.dp else None
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be finite and > 0, got {lr}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_optimizer(optimizer, momentum)
    images, labels, patients = _check_data(data)
    if augment_multiplicity > 1 and labels.ndim > 1:
        raise ValueError("augment_multiplicity > 1 applies to classification only (a label map would need the same "
                         "spatial transform as its image)")
    dev = resolve_device(device)
    home = next(model.parameters()).device
    use_seed = seed is not None and (dp is None or reproducible_dp)
    generator = torch.Generator()
    generator.manual_seed(seed if use_seed else secrets.randbits(63))
    noise_gen = None
    if dp is not None:
        noise_gen = torch.Generator(device=dev)
        noise_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)) if use_seed else secrets.randbits(63))

    images = images.to(dev)
    labels = labels.to(dev)
    model.to(dev)
    model.train()
    opt = make_optimizer(model.parameters(), optimizer, lr=lr, momentum=momentum)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    ema = IterateEMA(model, ema_decay) if ema_decay > 0 else None

    def after_step() -> None:
        """After each optimizer step: FedProx's decoupled pull, then fold the iterate into the EMA (both read
        only the released iterate and the round's global weights)."""
        if anchor is not None:
            with torch.no_grad():
                for p, p0 in zip(model.parameters(), anchor):
                    p.sub_(p - p0, alpha=lr * proximal_mu)
        if ema is not None:
            ema.update()

    loss_fn = criterion("sum")
    losses: list[float] = []
    empty_steps = 0
    t0 = time.perf_counter()
    if dp is None:
        n = images.shape[0]
        perm = torch.randperm(n, generator=generator)
        pos = 0
        for _ in range(steps):
            if pos >= n:
                perm, pos = torch.randperm(n, generator=generator), 0
            idx = perm[pos : pos + batch_size].to(dev)
            pos += batch_size
            opt.zero_grad(set_to_none=True)
            x = augment_views(images[idx], augment_multiplicity, generator)
            loss = loss_fn(model(x), labels[idx].repeat_interleave(augment_multiplicity, dim=0)) / len(x)
            loss.backward()
            opt.step()
            after_step()
            losses.append(loss.item())
    else:
        sampler = PatientSampler(patients, dp.sample_rate, generator)
        expected = max(1, round(dp.sample_rate * sampler.num_patients))
        private = PrivateStep(
            model, opt, dp, expected_batch_size=expected, grad_sample_mode=grad_sample_mode, generator=noise_gen,
            criterion=criterion, augment_multiplicity=augment_multiplicity, augment_generator=generator,
        )
        try:
            with warnings.catch_warnings():
                # first layer's input needs no gradient: torch warns that its full backward hook fires anyway
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                for _ in range(steps):
                    idx = sampler.sample().to(dev)
                    loss_value = private.step(images[idx], labels[idx])
                    after_step()
                    if loss_value is None:
                        empty_steps += 1
                    else:
                        losses.append(loss_value)
        finally:
            private.close()
    if ema is not None:
        ema.copy_to_model()
    if dev != home:
        model.to(home)
    seconds = time.perf_counter() - t0
    train_loss = float(sum(losses) / len(losses)) if losses else float("nan")
    return LocalTrainResult(
        steps=steps, train_loss=train_loss, num_examples=int(images.shape[0]), seconds=seconds, mechanism=mechanism,
        empty_steps=empty_steps,
    )
