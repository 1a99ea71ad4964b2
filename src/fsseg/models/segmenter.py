"""FewShotSegmenter: the one LightningModule of fsseg, composed of parts chosen by config.

    encoder (frozen)  ->  prototype head  ->  affinity decoder  ->  logits
                                                  |
                         main loss (weight) + auxiliary losses (training only, each with its weight)

A method is a config composing these parts; this module never switches on a method's name.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from fsseg.data import batch as B
from fsseg.errors import ConfigError
from fsseg.metrics import BaseClassFalsePositives, FewShotIoU
from fsseg.models.losses import AuxLoss
from fsseg.models.ops import binary_mask, upsample_logits
from fsseg.models.optim import build_optimizer


def metrics_from_trainer(trainer, split: str = "test") -> dict[str, Any]:
    """The metrics a segmenter logged for ``split`` as a plain dict (class_iou as a list, NaN = never seen)."""
    cm = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/")}
    out: dict[str, Any] = {k.split("/", 1)[1]: v for k, v in cm.items() if "/class_iou/" not in k}
    per_class = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in cm.items() if "/class_iou/" in k)
    out["class_iou"] = [v for _, v in per_class]
    if "episodes" in out:
        out["episodes"] = int(out["episodes"])
    return out


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


def _build(part: Any, **kwargs: Any) -> nn.Module:
    """A part is a module, or a factory (Hydra ``_partial_``) that takes the encoder's tap channels; a factory
    that names an ``encoder`` argument also gets the encoder (I2R's PMGM classifies with its ImageNet head)."""
    if isinstance(part, nn.Module):
        return part
    if callable(part):
        encoder = kwargs.pop("encoder", None)
        try:
            params = inspect.signature(part).parameters
        except (TypeError, ValueError):
            params = {}
        if "encoder" in params:
            kwargs["encoder"] = encoder
        return part(**kwargs)
    raise ConfigError(f"expected a module or a factory, got {type(part).__name__}")


@dataclass(frozen=True)
class EpisodeContext:
    """What parts may know about the episode besides images and support masks.

    ``class_idx``: the class's index in the split's class list (training: the fold's base classes, BAM's
    ``cat_idx``; evaluation: the novel classes). ``query_mask`` and ``query_base_label``: training only (None
    at evaluation, so no part can read the answer).
    """

    class_idx: torch.Tensor
    class_id: torch.Tensor | None = None
    query_mask: torch.Tensor | None = None
    query_base_label: torch.Tensor | None = None
    support_labels: torch.Tensor | None = None  # the support masks as given (0, 1, 255 = neither), (B, K, H, W)
    m_pro: torch.Tensor | None = None  # a frozen predictor's query foreground probability (B, 1, h, w), if any

    @classmethod
    def from_batch(cls, batch: Mapping[str, torch.Tensor], training: bool) -> EpisodeContext:
        return cls(
            class_idx=batch.get(B.CLASS_IDX),
            class_id=batch.get(B.CLASS_ID),
            support_labels=batch.get(B.SUPPORT_MASKS),
            query_mask=batch.get(B.QUERY_MASK) if training else None,
            query_base_label=batch.get(B.QUERY_BASE_LABEL) if training else None,
        )


def _takes_context(part: nn.Module) -> bool:
    try:
        return "context" in inspect.signature(part.forward).parameters
    except (TypeError, ValueError):
        return False


SCHEDULES = ("poly", "constant", "step")  # per-iteration lr factor (`configure_optimizers`)
PREDICTOR_KEYS = ("m_pro",)  # guidance a frozen predictor adds (`fsseg.models.predictors`)


def _check_declared_keys(head: nn.Module, decoder: nn.Module, predictor: nn.Module | None = None) -> None:
    """Parts may declare the guidance they provide / require (``provides`` / ``requires``): checked at build.
    A predictor provides ``m_pro`` to head and decoder; a part requiring it without a predictor is refused."""
    extra = set(PREDICTOR_KEYS) if predictor is not None else set()
    for part in (head, decoder):
        needs = sorted(set(getattr(part, "requires", None) or ()) & set(PREDICTOR_KEYS))
        if needs and predictor is None:
            raise ConfigError(
                f"{type(part).__name__} needs guidance {needs} from a frozen predictor, but predictor is null: "
                f"choose one (predictor=ssp | pro | hpa | rare | bam)"
            )
    provides, requires = getattr(head, "provides", None), getattr(decoder, "requires", None)
    if provides is None or requires is None:
        return
    missing = sorted(set(requires) - set(provides) - extra)
    if missing:
        raise ConfigError(
            f"decoder {type(decoder).__name__} needs guidance {missing} that head {type(head).__name__} does not "
            f"provide (it provides {sorted(provides)})"
        )


def _check_sub_model_classes(model: nn.Module, base_class_ids: Sequence[int] | None) -> None:
    """A frozen sub-model trained on base classes (``base_class_ids`` buffer) must have been trained on this
    fold's base classes, in this order: its output channels are read by class index."""
    if base_class_ids is None:
        return
    want = [int(c) for c in base_class_ids]
    for name, buf in model.named_buffers():
        if name.endswith("base_class_ids") and buf.tolist() != want:
            raise ConfigError(
                f"{name.removesuffix('.base_class_ids')} was trained on base classes {buf.tolist()}, but this run's "
                f"fold has base classes {want}: load the stage-1 file of this dataset and fold"
            )


def _merge_outputs(out: dict[str, Any], new: Mapping[str, Any], producer: str) -> None:
    clash = sorted(set(new) & set(out))
    if clash:
        raise ConfigError(f"{producer} returns {clash}, names already produced before it: rename its outputs")
    out.update(new)


def _check_deepest_masking(encoder: nn.Module) -> None:
    """support_masking=deepest masks the input of the deepest tapped stage: only the taps reading that stage
    alone (PFENet's ``high`` = layer4) may change, so no tap may mix it with shallower features."""
    taps = getattr(encoder, "taps", None)
    if taps is None or getattr(encoder, "_plan", None) is None:
        raise ConfigError(
            f"model.support_masking=deepest needs a FrozenEncoder with a masked forward; got {type(encoder).__name__}"
        )
    deepest = max(i for idx in taps.values() for i in idx)
    mixed = sorted(t for t, idx in taps.items() if deepest in idx and len(idx) > 1)
    if mixed:
        raise ConfigError(
            f"model.support_masking=deepest masks the input of the deepest tapped feature ({deepest}), but tap(s) "
            f"{mixed} ({ {t: taps[t] for t in mixed} }) combine it with shallower features, whose support values "
            f"would change too. Tap the deepest feature alone (PFENet: high=[4], mid=[3, 2]) or use "
            f"model.support_masking=none."
        )


def _relu_fed_classifier(decoder: nn.Module) -> nn.Conv2d | None:
    """The decoder's final 1x1 classifier conv when a ReLU feeds it (``decoder.cls`` ending in ReLU, optional
    dropout, 1x1 conv: PFENet, BAM's meta learner, CyCTR, SCCAN, Aff, HPA, RARE); None otherwise (HDMNet's
    BN-fed classifier, I2R's heads): there an all-zero hidden vector has no meaning."""
    cls = getattr(decoder, "cls", None)
    if not isinstance(cls, nn.Sequential) or len(cls) < 2:
        return None
    last = cls[-1]
    if not isinstance(last, nn.Conv2d) or last.kernel_size != (1, 1):
        return None
    before = [m for m in list(cls)[:-1] if not isinstance(m, (nn.Dropout, nn.Dropout2d))]
    return last if before and isinstance(before[-1], nn.ReLU) else None


class FewShotSegmenter(L.LightningModule):
    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module | Callable[..., nn.Module],
        decoder: nn.Module | Callable[..., nn.Module],
        main_loss: nn.Module,
        aux_losses: Mapping[str, AuxLoss] | None = None,
        main_loss_weight: float = 1.0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        base_lr: float = 0.0025,
        lr_multiplier: float = 1.0,
        schedule: str = "poly",
        poly_power: float = 0.9,
        step_milestones: Sequence[float] = (1 / 3, 2 / 3),
        step_gamma: float = 0.1,
        param_groups: Sequence[Mapping[str, Any]] = (),
        num_eval_classes: int = 5,
        eval_resolution: str = "original",
        shot_fusion: str = "average",
        vote_k: int | None = None,
        support_masking: str = "none",
        ensemble: nn.Module | None = None,
        base_class_ids: Sequence[int] | None = None,
        finite_check_every: int = 1,
        batched_aux_decoder: bool = False,
        compile: bool = False,
        channels_last: bool = False,
        encoder_bf16: bool = False,
        tta_scales: Sequence[float] = (1.0,),
        predictor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not (math.isfinite(base_lr) and base_lr > 0 and math.isfinite(lr_multiplier) and lr_multiplier > 0):
            raise ConfigError(
                f"optim.base_lr={base_lr} and optim.lr_multiplier={lr_multiplier}: expected finite numbers > 0"
            )
        if main_loss_weight < 0:
            raise ConfigError(f"model.main_loss_weight must be >= 0; got {main_loss_weight}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"model.schedule must be one of {list(SCHEDULES)}; got {schedule!r}")
        milestones = [float(m) for m in step_milestones]
        if not all(0.0 < m < 1.0 for m in milestones) or milestones != sorted(milestones):
            raise ConfigError(
                f"optim.milestones must be increasing fractions of the training steps in (0, 1); got {list(step_milestones)}"
            )
        if not (math.isfinite(step_gamma) and 0.0 < step_gamma <= 1.0):
            raise ConfigError(f"optim.gamma (step schedule factor) must be in (0, 1]; got {step_gamma}")
        self.step_milestones, self.step_gamma = milestones, float(step_gamma)
        if eval_resolution not in ("original", "network"):
            raise ConfigError(f"model.eval_resolution must be 'original' or 'network'; got {eval_resolution!r}")
        if shot_fusion not in ("average", "vote"):
            raise ConfigError(f"model.shot_fusion must be 'average' or 'vote'; got {shot_fusion!r}")
        if vote_k is not None and (isinstance(vote_k, bool) or not isinstance(vote_k, int) or vote_k < 1):
            raise ConfigError(f"model.vote_k must be an integer >= 1 (k of 'v-k'); got {vote_k!r}")
        if shot_fusion == "vote" and vote_k is None:
            raise ConfigError("model.shot_fusion=vote needs model.vote_k (foreground where >= vote_k shots agree)")
        if support_masking not in ("none", "deepest", "image"):
            raise ConfigError(f"model.support_masking must be 'none', 'deepest' or 'image'; got {support_masking!r}")
        self.support_masking = support_masking
        if isinstance(finite_check_every, bool) or not isinstance(finite_check_every, int) or finite_check_every < 1:
            raise ConfigError(
                f"model.finite_check_every must be an integer >= 1 (training steps between non-finite loss checks); "
                f"got {finite_check_every!r}"
            )
        flags = {"batched_aux_decoder": batched_aux_decoder, "compile": compile, "channels_last": channels_last,
                 "encoder_bf16": encoder_bf16}  # fmt: skip
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise ConfigError(f"model.{key} must be true or false; got {value!r}")
        self.tta_scales = tuple(float(x) for x in tta_scales)
        if not self.tta_scales or not all(math.isfinite(x) and x > 0 for x in self.tta_scales):
            raise ConfigError(f"model.tta_scales must be a non-empty list of positive scales; got {list(tta_scales)}")
        self.finite_check_every = finite_check_every
        self.batched_aux_decoder = batched_aux_decoder
        self.compile_parts = compile
        self.channels_last = channels_last
        self.encoder_bf16 = encoder_bf16
        self._device_prepared = False
        self._nonfinite: dict[str, Any] | None = None  # device-side flags of the current check window
        self.encoder = encoder
        if support_masking == "deepest":
            _check_deepest_masking(encoder)
        tap_channels = dict(getattr(encoder, "tap_channels", {}))
        self.head = _build(head, tap_channels=tap_channels, encoder=encoder)
        self.decoder = _build(decoder)
        self.ensemble = ensemble  # a stage after the decoder (BAM's learner ensemble), or None
        _check_sub_model_classes(self, base_class_ids)
        # PAHNet's prototype predictor (fsseg.models.predictors.FrozenPredictor): run once per episode, frozen, in
        # eval mode, under no_grad; its M_pro joins the guidance as "m_pro". Its weights stay out of this model's
        # state_dict (hence out of checkpoints): the config names the predictor run they are loaded from.
        self.predictor = predictor
        if predictor is not None:
            predictor.requires_grad_(False).eval()
            self._register_state_dict_hook(_drop_predictor_keys)
            self.register_load_state_dict_post_hook(_ignore_missing_predictor_keys)
        _check_declared_keys(self.head, self.decoder, predictor)
        self._head_context = _takes_context(self.head)
        self._decoder_context = _takes_context(self.decoder)
        if batched_aux_decoder and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.decoder.modules()):
            raise ConfigError(
                "model.batched_aux_decoder=true needs a decoder without BatchNorm (batch statistics would mix the "
                "main and auxiliary passes); set it to false for this decoder"
            )
        self.main_loss = main_loss
        self.aux_losses = nn.ModuleDict(dict(aux_losses or {}))
        self.main_loss_weight = float(main_loss_weight)
        self.optimizer_factory = optimizer or (lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9))
        self.base_lr, self.lr_multiplier = float(base_lr), float(lr_multiplier)
        self.schedule, self.poly_power = schedule, float(poly_power)
        self.param_group_cfg = [dict(g) for g in param_groups]
        self.eval_resolution = eval_resolution
        self.shot_fusion, self.vote_k = shot_fusion, vote_k
        self.val_iou = FewShotIoU(num_eval_classes)
        self.test_iou = FewShotIoU(num_eval_classes)
        # base-class pixels predicted foreground (final output; and the decoder's own when an ensemble follows)
        self.test_base_fp = nn.ModuleDict({"final": BaseClassFalsePositives(), "meta": BaseClassFalsePositives()})
        self.test_iou_meta = FewShotIoU(num_eval_classes)  # a method with an ensemble: its meta learner alone
        # per-episode measurements parts report at evaluation (`_diagnose`): split -> name -> running mean
        self.diagnostic_means = nn.ModuleDict({"val": nn.ModuleDict(), "test": nn.ModuleDict()})
        self._dead_hidden: torch.Tensor | None = None
        relu_classifier = _relu_fed_classifier(self.decoder)
        if relu_classifier is not None:
            relu_classifier.register_forward_pre_hook(self._record_dead_hidden)

    # ------------------------------------------------------------------ forward
    def encode(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        """Frozen-encoder taps of the query and the supports; support taps shaped (B, K, C, h, w).

        One pass over query and supports together, unless the reference's passes must be kept apart: with
        ``support_masking=deepest`` (the supports' deepest tapped stage runs on its input x mask: PFENet/BAM's
        ``layer4(layer3 * mask)``) or with batch-statistics BatchNorm in training (``encoder.bn=train``: the
        reference normalises the query batch and each shot's batch separately).
        A cached training batch (``data.feature_cache``) holds the taps already: the encoder is skipped.
        """
        cached = B.cached_taps(batch)
        if cached is not None:
            return tuple({name: f.float() for name, f in taps.items()} for taps in cached)
        q, s = batch[B.QUERY_IMG], batch[B.SUPPORT_IMGS]
        b, k = s.shape[:2]
        batch_stats = self.training and getattr(self.encoder, "bn", "frozen") == "train"
        if self.support_masking == "image":  # HDMNet: each support image x its mask before the backbone
            s = s * binary_mask(batch[B.SUPPORT_MASKS]).unsqueeze(2).to(s.dtype)
        if self.support_masking in ("none", "image") and not batch_stats:
            feats = self.encoder(torch.cat([q, s.flatten(0, 1)], dim=0))
            query = {name: f[:b] for name, f in feats.items()}
            support = {name: f[b:].view(b, k, *f.shape[1:]) for name, f in feats.items()}
            return query, support
        masks = binary_mask(batch[B.SUPPORT_MASKS]) if self.support_masking == "deepest" else None
        query = self.encoder(q)
        shots = [self.encoder(s[:, i], **({} if masks is None else {"mask": masks[:, i]})) for i in range(k)]
        support = {name: torch.stack([shot[name] for shot in shots], dim=1) for name in query}
        return query, support

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Logits (B, 2, h, w) at feature resolution plus the named intermediates of head and decoder.

        Parts whose ``forward`` takes a ``context`` argument receive the `EpisodeContext` (class of the
        episode; the query's labels in training only). A decoder or ensemble output may not reuse a name the
        head already produced.
        """
        out, guidance, context = self._guide(batch)
        decoded = self.decoder(guidance, context=context) if self._decoder_context else self.decoder(guidance)
        return self._finish(out, decoded, context)

    def _guide(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any], EpisodeContext]:
        """Encoder and head: (outputs so far, the head's guidance, the episode context)."""
        context = EpisodeContext.from_batch(batch, training=self.training)
        m_pro = None
        if self.predictor is not None:  # before the head: head (context.m_pro) and decoder (guidance) may read it
            if B.QUERY_IMG not in batch:
                raise ConfigError("a predictor needs the episode's images; data.feature_cache holds taps only: set it to null")
            with torch.no_grad():
                m_pro = self.predictor(batch).detach()
            context = dataclasses.replace(context, m_pro=m_pro)
        query, support = self._memory_format(*self.encode(batch))
        masks = binary_mask(batch[B.SUPPORT_MASKS])
        guidance = self.head(query, support, masks, context=context) if self._head_context else self.head(query, support, masks)
        if m_pro is not None:
            guidance = {**guidance, "m_pro": m_pro}
        out = dict(guidance)
        out["query_taps"], out["support_taps"] = query, support
        return out, guidance, context

    def _finish(self, out: dict[str, Any], decoded: Mapping[str, Any], context: EpisodeContext) -> dict[str, Any]:
        """The decoder's outputs joined (no name re-used), then the ensemble, if any."""
        _merge_outputs(out, decoded, type(self.decoder).__name__)
        if self.ensemble is not None:  # it re-defines "logits": the decoder's are kept as it names them
            ensembled = self.ensemble(out, context)
            out.pop("logits")
            _merge_outputs(out, ensembled, type(self.ensemble).__name__)
        return out

    def _memory_format(self, query: dict, support: dict) -> tuple[dict, dict]:
        """``channels_last``: the taps enter head and decoder in channels-last layout (whose convolutions then stay
        in it); support taps (B, K, C, h, w) are converted per shot. Off by default: on CPU the channels-last
        kernels round differently, and published CPU results must stay bit-identical."""
        if not self.channels_last:
            return query, support
        cl = torch.channels_last
        query = {k: v.contiguous(memory_format=cl) if v.dim() == 4 else v for k, v in query.items()}
        support = {
            k: v.flatten(0, 1).contiguous(memory_format=cl).unflatten(0, v.shape[:2]) if v.dim() == 5 else v
            for k, v in support.items()
        }
        return query, support

    # ------------------------------------------------------------------ device set-up (GPU path)
    def prepare_for_device(self) -> None:
        """Once, when a Trainer starts: ``channels_last`` converts head and decoder weights; ``encoder_bf16`` casts
        the frozen encoder to bf16 under bf16 mixed precision on CUDA (instead of autocast re-casting every weight
        on every forward); ``compile`` compiles head and decoder (and the encoder, which only runs in eval) in
        place with torch.compile (``nn.Module.compile``: parameter names and checkpoints unchanged)."""
        if self._device_prepared:
            return
        self._device_prepared = True
        if self.channels_last:
            self.head.to(memory_format=torch.channels_last)
            self.decoder.to(memory_format=torch.channels_last)
        trainer = self._trainer
        precision = str(getattr(trainer, "precision", "")) if trainer is not None else ""
        if self.encoder_bf16 and precision.startswith("bf16") and self.device.type == "cuda":
            self.encoder.to(torch.bfloat16)
        if self.compile_parts:
            for part in (self.head, self.decoder, self.encoder):
                part.compile()

    def on_fit_start(self) -> None:
        self._check_ddp_gradients()
        self._check_autograd_at_eval()
        self.prepare_for_device()

    def _check_ddp_gradients(self) -> None:
        """DDP without find_unused_parameters fails at the second step when a trainable parameter gets no gradient:
        parts that know theirs (`parameters_without_gradient`) are refused here, before any step, naming the fix."""
        from lightning.pytorch.strategies import DDPStrategy

        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        if not isinstance(strategy, DDPStrategy) or strategy._ddp_kwargs.get("find_unused_parameters", False):
            return
        idle = [f"{name}.{p}" for name in ("head", "decoder", "ensemble") for p in
                getattr(getattr(self, name), "parameters_without_gradient", list)()]  # fmt: skip
        if idle:
            raise ConfigError(
                f"DDP without find_unused_parameters, but {len(idle)} trainable parameters never get a gradient "
                f"(e.g. {idle[:2]}): set decoder.final_support_branch=false (outputs unchanged) or "
                f"trainer.strategy=ddp_find_unused_parameters_true"
            )

    def on_test_start(self) -> None:
        self._check_autograd_at_eval()
        self.prepare_for_device()

    @torch.no_grad()
    def predict(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits upsampled to the network input size (B, 2, H, W); with ``shot_fusion=vote`` the vote logits."""
        if self.shot_fusion == "vote":
            return self.vote_logits(self.shot_logits(batch))
        return upsample_logits(self(batch)["logits"], batch[B.QUERY_IMG].shape[-2:])

    # K-shot voting (CELP Sec. 5.4, Table 7: "v-k"; its test_vote.py): evaluation only, any trained model.
    @torch.no_grad()
    def shot_logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One 1-shot forward per support, the K shots folded into the batch (the query repeated K times):
        logits (B, K, 2, H, W) at the network input size."""
        q, s, m = batch[B.QUERY_IMG], batch[B.SUPPORT_IMGS], batch[B.SUPPORT_MASKS]
        b, k = s.shape[:2]
        folded = {
            B.QUERY_IMG: q.repeat_interleave(k, 0),
            B.SUPPORT_IMGS: s.flatten(0, 1)[:, None],
            B.SUPPORT_MASKS: m.flatten(0, 1)[:, None],
        }
        logits = upsample_logits(self(folded)["logits"], q.shape[-2:])
        return logits.view(b, k, *logits.shape[1:])

    def vote_logits(self, shot_logits: torch.Tensor) -> torch.Tensor:
        """Per-shot logits (B, K, 2, ...) -> (B, 2, ...): each shot votes foreground where its argmax is 1; the
        pixel is foreground where >= vote_k shots vote so. Logits [0, votes - k + 0.5] give that argmax."""
        shots = shot_logits.shape[1]
        if not 1 <= self.vote_k <= shots:
            raise ConfigError(f"model.vote_k must be in [1, shots]; got vote_k={self.vote_k} with {shots} shot(s)")
        votes = shot_logits.argmax(dim=2).sum(dim=1).to(shot_logits.dtype)
        return torch.stack([torch.zeros_like(votes), votes - self.vote_k + 0.5], dim=1)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.batched_aux_decoder:
            out, aux_terms = self._batched_forward(batch)
        else:
            out, aux_terms = self(batch), {}
        main = self.main_loss(out["logits"], batch[B.QUERY_MASK])
        terms = {"main": main}
        loss = self.main_loss_weight * main
        for name, aux in self.aux_losses.items():
            values = aux_terms[name] if name in aux_terms else aux(out, batch, self)
            for term, value in values.items():
                terms[f"{name}/{term}"] = value
                loss = loss + aux.weight * value
        self._check_finite(loss, terms)
        bs = batch[B.QUERY_MASK].shape[0]  # cached batches hold taps, not images
        # on the progress bar only with a check every step: Lightning turns progress-bar values into Python floats
        # (a host sync) after every step
        self.log("train/loss", loss, prog_bar=self.finite_check_every == 1, batch_size=bs)
        for k, v in terms.items():
            self.log(f"train/{k}", v, batch_size=bs)
        return loss

    # ------------------------------------------------------------------ non-finite losses
    def _check_finite(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        """``finite_check_every`` = 1: raise now (a host sync every step). N > 1: record on the device whether this
        step's loss is finite (and the first bad step's terms); ``raise_if_nonfinite`` reads it every N steps, at
        epoch end, before validation and before a checkpoint is written - the training step itself never syncs."""
        if self.finite_check_every == 1:
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}) at global step {self.global_step} "
                    f"(terms: { {k: float(v.detach()) for k, v in terms.items()} }); training stopped, "
                    "last good checkpoint kept"
                )
            return
        values = torch.stack([loss.detach().float().reshape(()), *(v.detach().float().reshape(()) for v in terms.values())])
        bad = ~torch.isfinite(values[0])
        state = self._nonfinite
        if state is None:
            state = self._nonfinite = {
                "first": torch.full((), -1, dtype=torch.long, device=values.device),
                "values": torch.zeros_like(values),
                "names": ["loss", *terms],
                "start": self.global_step,
                "steps": 0,
            }
        newly = bad & (state["first"] < 0)
        state["first"] = torch.where(newly, self.global_step, state["first"])
        state["values"] = torch.where(newly, values, state["values"])
        state["steps"] += 1

    def raise_if_nonfinite(self) -> None:
        """Read the device-side flags of the current window (one host sync) and raise NonFiniteLossError naming the
        first bad step, the window and the loss terms at that step; then start a new window."""
        state, self._nonfinite = self._nonfinite, None
        if state is None:
            return
        first = int(state["first"])
        if first < 0:
            return
        vals = {k: float(v) for k, v in zip(state["names"], state["values"].tolist(), strict=True)}
        loss = vals.pop("loss")
        raise NonFiniteLossError(
            f"non-finite loss ({loss}) at global step {first} (checked every {self.finite_check_every} steps: window "
            f"of steps {state['start']}-{state['start'] + state['steps'] - 1}; terms: {vals}); training stopped, "
            "last good checkpoint kept"
        )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._nonfinite is not None and self._nonfinite["steps"] >= self.finite_check_every:
            self.raise_if_nonfinite()

    def on_train_epoch_end(self) -> None:
        self.raise_if_nonfinite()

    def on_validation_start(self) -> None:
        self._check_autograd_at_eval()
        self.raise_if_nonfinite()
        self.prepare_for_device()

    # ------------------------------------------------------------------ one batched decoder pass
    def _batched_forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, dict]]:
        """``batched_aux_decoder``: the main decoder pass and the auxiliary passes of the losses that offer one
        (``decoder_request``: APANet's class-agnostic branch, CELP's contrast) as ONE decoder forward over the
        concatenated batch. Same losses as the separate passes up to float rounding, but not bit-identical (and
        dropout draws one mask for the whole batch), hence opt-in. Returns the main outputs and the auxiliary
        losses' terms computed from their share of the pass."""
        out, guidance, context = self._guide(batch)
        requests = {}
        for name, aux in self.aux_losses.items():
            request = getattr(aux, "decoder_request", None)
            if request is not None:
                got = request(out, batch, self)
                if got is not None:
                    requests[name] = got
        if not requests:
            return self._finish(out, self.decoder(guidance), context), {}
        parts = [guidance, *(g for g, _ in requests.values())]
        dec = self.decoder(merge_guidance(parts))
        pieces = split_decoder_output(dec, len(parts))
        self._finish(out, pieces[0], context)
        terms = {name: finish(piece) for (name, (_, finish)), piece in zip(requests.items(), pieces[1:], strict=True)}
        return out, terms

    # ------------------------------------------------------------------ evaluation
    def score_logits(self, batch: Mapping[str, torch.Tensor], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at network size -> (logits, target) at the scoring resolution.

        ``original``: the content region of the padded input is mapped bilinearly onto the original label grid
        (one grid_sample for the whole batch); ``network``: the resized-and-padded label as is.
        """
        if self.eval_resolution == "network" or B.QUERY_LABEL_ORI not in batch:
            return logits, batch[B.QUERY_MASK]
        target = batch[B.QUERY_LABEL_ORI]
        hm, wm = target.shape[-2:]
        h_net, w_net = logits.shape[-2:]
        ori = batch[B.ORI_SIZE].to(logits.dtype)
        content = batch[B.CONTENT_SIZE].to(logits.dtype)
        ys = torch.arange(hm, device=logits.device, dtype=logits.dtype) + 0.5
        xs = torch.arange(wm, device=logits.device, dtype=logits.dtype) + 0.5
        # pixel centre in original coords -> network coords -> normalised [-1, 1] (align_corners=False)
        gy = (ys[None, :] * (content[:, 0:1] / ori[:, 0:1])) / h_net * 2 - 1  # B, Hm
        gx = (xs[None, :] * (content[:, 1:2] / ori[:, 1:2])) / w_net * 2 - 1  # B, Wm
        grid = torch.stack(
            [gx[:, None, :].expand(-1, hm, -1), gy[:, :, None].expand(-1, -1, wm)], dim=-1
        )  # B, Hm, Wm, 2
        mapped = F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return mapped, target

    def _eval_step(self, batch: Mapping[str, torch.Tensor], metric: FewShotIoU, base_fp: nn.ModuleDict | None = None) -> None:
        if self.shot_fusion == "vote":  # vote on the scoring grid: each shot's logits mapped there first
            shots = self.shot_logits(batch)
            mapped, target = self.score_logits(batch, shots.flatten(1, 2))
            logits = self.vote_logits(mapped.unflatten(1, shots.shape[1:3]))
        else:
            with torch.no_grad():
                out = self(batch)
            size = batch[B.QUERY_IMG].shape[-2:]
            net_logits = upsample_logits(out["logits"], size)  # = predict(batch)
            if self.tta_scales != (1.0,):
                net_logits, out = self._test_time_scales(batch, out, net_logits)
            # testing a method with an ensemble: its meta learner is scored alone too (not in validation)
            meta = upsample_logits(out["meta_logits"], size) if base_fp is not None and "meta_logits" in out else None
            if base_fp is not None and B.QUERY_BASE_LABEL in batch:  # at network size, where the base label is
                base_fp["final"].update(net_logits, batch[B.QUERY_BASE_LABEL])
                if meta is not None:
                    base_fp["meta"].update(meta, batch[B.QUERY_BASE_LABEL])
            if meta is not None:
                self.test_iou_meta.update(*self.score_logits(batch, meta), batch[B.CLASS_IDX])
            logits, target = self.score_logits(batch, net_logits)
            self._diagnose(out, batch, "test" if metric is self.test_iou else "val")
        metric.update(logits, target, batch[B.CLASS_IDX])

    def _test_time_scales(self, batch, out, net_logits):
        """I2R's test-time augmentation: the whole episode (query, supports, support masks) resized by each scale,
        the outputs brought back to the network size and averaged with the scale-1 pass (``logits`` and
        ``meta_logits``). Scales other than 1 never enter the diagnostics."""
        size = batch[B.QUERY_IMG].shape[-2:]
        keys = [k for k in ("logits", "meta_logits") if k in out]
        sums = {k: (net_logits if k == "logits" else upsample_logits(out[k], size)) * 0 for k in keys}
        for scale in self.tta_scales:
            if scale == 1.0:
                scaled_out = out
            else:
                scaled = dict(batch)
                q, s, m = batch[B.QUERY_IMG], batch[B.SUPPORT_IMGS], batch[B.SUPPORT_MASKS]
                new = [max(1, round(x * scale)) for x in size]
                scaled[B.QUERY_IMG] = F.interpolate(q, new, mode="bilinear", align_corners=True)
                scaled[B.SUPPORT_IMGS] = F.interpolate(s.flatten(0, 1), new, mode="bilinear", align_corners=True).unflatten(0, s.shape[:2])
                scaled[B.SUPPORT_MASKS] = F.interpolate(m.flatten(0, 1)[:, None].float(), new, mode="nearest")[:, 0].long().unflatten(0, m.shape[:2])
                with torch.no_grad():
                    scaled_out = self(scaled)
            for k in keys:
                sums[k] = sums[k] + upsample_logits(scaled_out[k], size)
        averaged = dict(out)
        for k in keys:
            averaged[k] = sums[k] / len(self.tta_scales)
        return averaged["logits"], averaged

    # A part may measure something per episode at evaluation (I2R's Table 4 prior cross entropy, Table 5 mask
    # ratios): ``diagnostics(outputs, batch) -> {name: (B,) tensor}``, called AFTER the forward with the whole
    # batch, labels included - a measurement, never an input of the prediction. Logged as ``<split>/<name>``.
    def _diagnose(self, out: Mapping[str, Any], batch: Mapping[str, torch.Tensor], split: str) -> None:
        means = self.diagnostic_means[split]
        for part in (self.head, self.decoder, self.ensemble):
            report = getattr(part, "diagnostics", None)
            if report is None:
                continue
            with torch.no_grad():
                values = report(out, batch)
            for name, value in values.items():
                if name not in means:
                    means[name] = MeanMetric().to(value.device)
                means[name].update(value.detach().float())
        if self._dead_hidden is not None:  # from the last decoder forward of this batch
            if "dead_hidden" not in means:
                means["dead_hidden"] = MeanMetric().to(self._dead_hidden.device)
            means["dead_hidden"].update(self._dead_hidden)
            self._dead_hidden = None

    # The decoder's classifier at evaluation (PFENet-style ``cls`` = ... ReLU [Dropout] 1x1 conv): the share of
    # query positions where every hidden unit is zero, i.e. where the prediction is the classifier's bias alone.
    # Every collapsed run of compare-bam (all-background, or PFENet's slow starts) had such a region and no healthy
    # run did (docs/notes.md "compare-bam"); logged as ``<split>/dead_hidden`` (decoder resolution).
    def _record_dead_hidden(self, module: nn.Module, args: tuple) -> None:
        if not self.training:
            self._dead_hidden = (args[0].detach().amax(dim=1) <= 0).float().mean(dim=(1, 2))

    def _log_diagnostics(self, split: str) -> None:
        for name, mean in self.diagnostic_means[split].items():
            if mean.update_called:
                self.log(f"{split}/{name}", float(mean.compute()), sync_dist=False)
            mean.reset()

    # A part that computes gradients at evaluation (I2R's CAMs) declares ``needs_autograd_at_eval = True`` and
    # runs its own ``torch.enable_grad()`` block; everything else stays under no_grad. Inference mode would
    # silently turn its gradients off, so it is refused up front.
    def _check_autograd_at_eval(self) -> None:
        needs = [n or type(self).__name__ for n, m in self.named_modules() if getattr(m, "needs_autograd_at_eval", False)]
        trainer = self._trainer
        planned = trainer is not None and any(
            getattr(loop, "inference_mode", False) for loop in (trainer.validate_loop, trainer.test_loop)
        )  # at fit start: refuse before any training, not at the first validation
        if needs and (torch.is_inference_mode_enabled() or planned):
            raise ConfigError(
                f"{needs} compute gradients at evaluation (e.g. CAMs), which inference mode forbids: set "
                f"trainer.inference_mode=false"
            )

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_iou)

    def on_validation_epoch_end(self):
        self._log_metric("val", self.val_iou)
        self._log_diagnostics("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_iou, self.test_base_fp)

    def on_test_epoch_end(self):
        self._log_metric("test", self.test_iou)
        self._log_diagnostics("test")
        for name, key in (("final", "base_fp_rate"), ("meta", "base_fp_rate_meta")):
            values = self.test_base_fp[name].compute()  # summed over ranks
            if int(values["pixels"]) > 0:
                self.log(f"test/{key}", float(values["rate"]), sync_dist=False)
            self.test_base_fp[name].reset()
        if int(self.test_iou_meta.episodes) > 0:  # the ensemble's own contribution = final - meta
            values = self.test_iou_meta.compute()
            for key in ("miou", "fbiou", "fp_rate", "fn_rate"):
                self.log(f"test/{key}_meta", float(values[key]), sync_dist=False)
            self.test_iou_meta.reset()

    def _log_metric(self, split: str, metric: FewShotIoU) -> None:
        """Log the reduced metric (states are summed across ranks by ``compute``): scalars and per-class IoU,
        so ``trainer.callback_metrics`` carries everything back, also from ``ddp_spawn`` workers."""
        values = metric.compute()
        for key in ("miou", "fbiou", "fp_rate", "fn_rate", "episodes"):
            self.log(f"{split}/{key}", float(values[key]), prog_bar=key == "miou", sync_dist=False)
        for i, v in enumerate(values["class_iou"].tolist()):
            self.log(f"{split}/class_iou/{i}", float(v), sync_dist=False)
        metric.reset()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("predictor.")]
        groups: list[dict[str, Any]] = []
        taken: set[str] = set()
        for cfg in self.param_group_cfg:
            pattern = re.compile(cfg["match"])
            params = [p for n, p in named if n not in taken and pattern.search(n)]
            taken.update(n for n, _ in named if pattern.search(n))
            if not params:
                raise ConfigError(f"model.param_groups: pattern {cfg['match']!r} matches no trainable parameter")
            g = {k: v for k, v in cfg.items() if k not in ("match", "lr_multiplier", "base_lr")}
            g["params"] = params
            g["lr"] = float(cfg.get("base_lr", self.base_lr)) * float(cfg.get("lr_multiplier", self.lr_multiplier))
            g.setdefault("schedule", self.schedule)
            groups.append(g)
        rest = [p for n, p in named if n not in taken]
        if rest:
            groups.insert(0, {"params": rest, "lr": self.base_lr * self.lr_multiplier, "schedule": self.schedule})
        schedules = [g.pop("schedule") for g in groups]
        for s in schedules:
            if s not in SCHEDULES:
                raise ConfigError(f"param group schedule must be one of {list(SCHEDULES)}; got {s!r}")
        # a group may name its own optimizer (CyCTR: AdamW for the transformer): several -> one CompositeOptimizer
        factories = [g.pop("optimizer", None) or self.optimizer_factory for g in groups]
        opt, order = build_optimizer(groups, factories)
        schedules = [schedules[i] for i in order]
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        power = self.poly_power

        def poly(step: int) -> float:  # per-iteration poly decay: (1 - it/max_it)^power
            return max(0.0, 1.0 - step / total) ** power

        bounds = [m * total for m in self.step_milestones]
        gamma = self.step_gamma

        def step_decay(step: int) -> float:  # SSP: lr x gamma at each milestone (1/3 and 2/3 of the steps)
            return gamma ** sum(step >= b for b in bounds)

        factor = {"poly": poly, "step": step_decay, "constant": lambda step: 1.0}
        lambdas = [factor[s] for s in schedules]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambdas)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_nonfinite()  # never write weights trained past an unchecked non-finite loss
        if self.encoder_bf16:  # checkpoints keep fp32 tensors (the bf16-rounded frozen weights, as the run used)
            sd = checkpoint.get("state_dict", {})
            for k, v in sd.items():
                if k.startswith("encoder.") and isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16:
                    sd[k] = v.float()
        checkpoint["fsseg_rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]),
            "python": list(random.getstate()[1]),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("fsseg_rng")
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        np.random.set_state(("MT19937", np.asarray(rng["numpy"], dtype=np.uint32), rng["numpy_pos"], 0, 0.0))
        random.setstate((3, tuple(rng["python"]), None))

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self.encoder, "train"):
            self.encoder.train(mode)  # a frozen encoder keeps itself in eval (its own override)
        if self.predictor is not None:
            self.predictor.eval()  # never trained: BatchNorm statistics and dropout fixed
        return self


def _drop_predictor_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict hook: the frozen predictor's tensors are not part of the host's checkpoint."""
    for key in [k for k in state_dict if k.startswith(prefix + "predictor.")]:
        del state_dict[key]


def _ignore_missing_predictor_keys(module: nn.Module, incompatible_keys: Any) -> None:
    """load_state_dict hook: a host checkpoint has no predictor tensors (the predictor loads its own run)."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith("predictor.")]


# Optional guidance masks whose absence means "nothing marked": a part without one gets zeros shaped like the
# named key when another part of a merged pass has it (CELP's contrast pass beside the main pass).
ZERO_WHEN_ABSENT = {"support_ignore_feat": "support_mask_feat"}


def merge_guidance(parts: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Decoder inputs of several passes concatenated along the batch: every key that is a tensor in all parts
    with the same shape after the first dimension. A (B, D, 1, 1) prototype beside a (B, D, h, w) prototype map is
    expanded to the map's size (FEM pools a map per scale; the pooled constant map is the vector up to rounding).
    Keys of ``ZERO_WHEN_ABSENT`` are zeros in the parts that lack them.
    Keys that cannot be concatenated are left out (the decoder must not need them)."""
    for key, like in ZERO_WHEN_ABSENT.items():
        if any(key in p for p in parts) and not all(key in p for p in parts):
            parts = [p if key in p or like not in p else {**p, key: torch.zeros_like(p[like])} for p in parts]
    merged: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        values = [p.get(key) for p in parts]
        if not all(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in values):
            continue
        if key == "prototype" and len({tuple(v.shape[2:]) for v in values}) > 1:
            size = max((tuple(v.shape[2:]) for v in values), key=lambda s: s[0] * s[1] if len(s) == 2 else 0)
            values = [v.expand(*v.shape[:2], *size) if tuple(v.shape[2:]) == (1, 1) else v for v in values]
        if len({tuple(v.shape[1:]) for v in values}) == 1:
            merged[key] = torch.cat(values, dim=0)
    return merged


def split_decoder_output(dec: Mapping[str, Any], n: int) -> list[dict[str, Any]]:
    """The decoder output of a merged pass cut back into ``n`` equal batch shares (tensors and lists of tensors)."""
    pieces: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in dec.items():
        if isinstance(value, torch.Tensor):
            for piece, chunk in zip(pieces, value.chunk(n, dim=0), strict=True):
                piece[key] = chunk
        elif isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
            chunks = [v.chunk(n, dim=0) for v in value]
            for i, piece in enumerate(pieces):
                piece[key] = [c[i] for c in chunks]
    return pieces


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["EpisodeContext", "FewShotSegmenter", "NonFiniteLossError", "count_parameters"]
