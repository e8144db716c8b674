"""The one configuration schema of redi: typed dataclasses, named profiles, YAML, overrides.

Every entry point (CLI, DVC's params.yaml, the Kubeflow pipeline, serving) builds its settings
through :func:`load_config`, so defaults live here and nowhere else.

Profiles:
- ``paper``: the paper's settings (Sec. 4.1.3): WideResNet-50-2, 256 px, recover 500 epochs lr
  5e-4 halved at 200/400, discriminate 300 epochs lr 5e-3 halved at 100/200, batch 32, AdamW. A
  GPU budget; WideResNet-50-2's weights must be on disk (a clear error says where otherwise).
- ``paper_lite``: the paper's budget with EfficientNet-Lite2, whose weights install offline.
- ``cpu``: a budget in optimizer steps (any line trains in the same time: a few minutes on 2
  cores) with a narrow recover net at 128 px; the default.
- ``cpu_wide``: the ``cpu`` budget with the paper-width recover net at 256 px (about 20 times the
  recover training time; the ``cpu`` profile before the method study of issue 9).
- ``fast``: the ``cpu`` profile with EfficientNet-Lite0.
- ``tiny``: seconds; for tests and CI.

Besides the model's settings, the schema holds a product line's operations settings, so a line
file (``pipelines/lines/<line>.yaml``) is an ordinary redi config file:
- ``line``: the line's name, its data source (path, DVC repository, revision) and demo options;
- ``gate``: the evaluation gate's minimums and tolerance (``redi.ops.gate.GatePolicy``);
- ``pipeline``: how the Kubeflow pipeline runs on a cluster (object-store secret, schedule,
  resources and retries per step, accelerator, node selector, tolerations, work-dir volume);
- ``monitor``: the line's drift check (``redi.ops.monitoring``): how many production rows it
  compares, and its own schedule.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from redi.core.errors import ConfigError
from redi.core.images import ASPECTS
from redi.core.maps import IMAGE_SCORES

PROMPT_MODES = ("nearest", "none")
PROMPT_CODECS = ("webp", "png")
PRECISIONS = ("auto", "fp32", "bf16")
SELFMAP_SCALES = ("line", "image")
PROMPT_TRANSFORMS = ("hflip", "vflip", "rot90", "rot180", "rot270")
RECOVER_SELECTIONS = ("last", "best_val")
LS_NORMALISATIONS = ("width", "area")
TOLERATION_KEYS = ("key", "operator", "value", "effect")
# the candidates of the cpu and paper profiles (tiny, the tests' profile, fits model.method alone)
DEFAULT_CANDIDATES = ("redi", "patchcore", "fused")


@dataclass
class DataConfig:
    """Where a product line's images are and how they are read."""

    root: str = "data/demo/bottle_caps"
    image_size: int = 256
    skip_bad_files: bool = False  # when True, bad files are skipped and listed instead of failing
    val_fraction: float = 0.15  # normal train images held out to set the decision threshold
    min_val_images: int = 2
    # squash: resize to S x S (aspect lost); letterbox: scale the long side to S and pad the
    # short one (black), so strips and rails keep their shape; native: resize to the line's own
    # canvas, short side S and the long side at the line's median aspect (a multiple of 32, at
    # most 4 S), so a strip keeps its rows and its columns (redi.core.images.native_canvas)
    aspect: str = "squash"
    # the input canvas [height, width] of aspect=native: [] (the default) is measured on the line's
    # training images when a model is fitted, and the fitted model keeps it in its config
    canvas: list[int] = field(default_factory=list)

    def input_hw(self) -> tuple[int, int]:
        """The model's input ``(height, width)``: ``(S, S)``, or the canvas for aspect=native.

        Raises:
            ConfigError: aspect=native and the canvas is not set (fit a model on the line first).
        """
        if self.aspect != "native":
            return self.image_size, self.image_size
        if len(self.canvas) != 2:
            raise ConfigError("data.aspect=native needs the line's canvas (data.canvas: [height, width]); it is "
                              "measured when a model is fitted, so load the fitted model's config, or set it")
        return int(self.canvas[0]), int(self.canvas[1])


@dataclass
class SelfMapConfig:
    """The self-generated map fed to the recover net (paper Table 5, Table 10)."""

    kind: str = "hog"
    hog_orientations: int = 9
    hog_cell: int = 8
    canny_low: float = 50.0
    canny_high: float = 100.0
    # line: one fixed scale per line (scale_percentile of the raw maps over the bank's images,
    # stored in the artifact), so a defect's strong gradient cannot dim the rest of its map;
    # image: each map divided by its own maximum (the scaling before this option existed)
    scale: str = "line"
    scale_percentile: float = 99.5


@dataclass
class RecoverNetConfig:
    """The HIP recover network (two half-width UNet encoders and one decoder)."""

    enabled: bool = True  # False: the recovery branch sees X itself (RD + L_S ablation)
    base_width: int = 32  # half of the usual UNet's 64
    depth: int = 5  # number of encoder levels: widths base * 2**i for i < depth
    input_size: int = 0  # 0: the image size; else the recover net runs at this size, output upsampled
    fused_skips: bool = True  # skip connections carry the fused (H, X+) features
    # auto: bf16 when it measures >= 1.3x faster than fp32 on the running machine (redi.core.utils.
    # bf16_speedup); training freezes the decision into the detector, so it serves as it calibrated
    precision: str = "auto"


@dataclass
class PatchCoreConfig:
    """The memory-bank method ``patchcore`` (Roth et al., 2022): locally aware patch features of
    two backbone levels, a greedy coreset of them, nearest-neighbour distance with reweighting."""

    levels: list[int] = field(default_factory=lambda: [1, 2])  # backbone levels (0: stride 4, 1: 8, 2: 16)
    coreset_ratio: float = 0.1  # share of the training patches kept in the memory bank (the paper's 10 %)
    num_neighbors: int = 9  # b of the image score's reweighting (paper eq. 7; anomalib's default)
    projection_dim: int = 128  # random projection the coreset's greedy search measures in (0: none)
    # patches pooled from training before the coreset; above it a random subsample (seeded) is taken,
    # so a 700-image line fits in minutes on a CPU (the coreset costs bank x pool x projection_dim)
    max_patches: int = 200_000


@dataclass
class FusedConfig:
    """The ``fused`` method: its parts' anomaly maps, each standardised on the held-out normals, averaged."""

    parts: list[str] = field(default_factory=lambda: ["redi", "patchcore"])


@dataclass
class ModelConfig:
    """Model architecture and ablation switches."""

    method: str = "redi"  # the registered method (redi.methods.base.method_names()) fitted when no candidates
    # the line's candidates: each is fitted, measured on validation (no test label) and the best by
    # the rule of redi.workflow.champion serves; [] fits model.method alone
    candidates: list[str] = field(default_factory=list)
    patchcore: PatchCoreConfig = field(default_factory=PatchCoreConfig)
    fused: FusedConfig = field(default_factory=FusedConfig)
    backbone: str = "efficientnet_lite2"
    backbone_weights: str = ""  # optional weights file (needed for wide_resnet50_2 offline)
    selfmap: SelfMapConfig = field(default_factory=SelfMapConfig)
    prompt: str = "nearest"  # "none" is the paper's "Free" ablation: a zero prompt image
    prompt_k: int = 1  # k nearest prompts: one recovery each, the anomaly map is their pixelwise minimum
    prompt_transforms: list[str] = field(default_factory=list)  # bank augmented with these (e.g. hflip, rot180)
    recover: RecoverNetConfig = field(default_factory=RecoverNetConfig)
    use_frb: bool = True  # False: F_Y is R_Y itself (no Feature Recovery Block), Table 11
    bottleneck_channels: int = 0  # 0: bottleneck_ratio x the deepest backbone level's channel count
    bottleneck_ratio: float = 1.0  # Reverse Distillation's is 2 (WideResNet: 1024 -> 2048)
    # anti-copying (RD-family work): dropout on the discriminate head's bottleneck while it trains,
    # so it must restore features it cannot see instead of passing a defect's features through
    bottleneck_dropout: float = 0.0
    gaussian_sigma: float = 4.0  # smoothing of the anomaly map (RD / anomalib use 4)
    # ReDi's and fused's image score from the map (redi.core.maps.image_scores): top_mean, the mean of
    # the top image_score_share of its pixels (validation's pick on the dev sets, docs/champion.md), or
    # max (the paper's); PatchCore keeps its reweighting
    image_score: str = "top_mean"
    image_score_share: float = 0.01
    # How the detector stores its prompt images. WebP q85 keeps a 650-image 256 px bank at
    # 1.5-16 MB instead of 128 MB raw (docs/benchmarks.md); the recover net trains on exactly the
    # decoded prompts, so lossy storage costs no train/serve mismatch. "png" is lossless.
    prompt_codec: str = "webp"
    prompt_quality: int = 85  # WebP quality (ignored by png)


@dataclass
class StageTrainConfig:
    """Optimiser and schedule for one training stage."""

    epochs: int = 10
    # > 0: the budget is this many optimizer steps whatever the line's size (epochs is ignored
    # and milestones count steps); 0: the budget is epochs (milestones count epochs)
    steps: int = 0
    # with a step budget, at least this many passes over the line's images: a 760-image line gets
    # as many passes as a 50-image one would (steps and milestones are scaled up together)
    min_passes: int = 0
    max_minutes: float = 0.0  # > 0: the stage stops after this long, keeps its model, and says so (rerun resumes)
    lr: float = 5e-4
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.5
    batch_size: int = 8
    weight_decay: float = 1e-2  # AdamW's default


@dataclass
class TrainConfig:
    """Both training stages, losses and run settings."""

    recover: StageTrainConfig = field(default_factory=lambda: StageTrainConfig(epochs=40, lr=5e-4))
    discriminate: StageTrainConfig = field(default_factory=lambda: StageTrainConfig(epochs=20, lr=5e-3))
    lambda_m: float = 1.0  # weight of the MSGMS loss (paper: 1)
    lambda_s: float = 1.0  # weight of the self-correlation loss (paper: 1)
    use_self_correlation: bool = True  # L_S on/off ablation
    # anti-copying: Gaussian noise of this many times each level's feature standard deviation, added
    # to the recovered image's features inside one random box per image while the discriminate head
    # trains (its target F_X stays clean), so it learns to restore corrupted regions; 0: off
    feature_noise: float = 0.0
    msgms_scales: int = 4
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA; ignored on the CPU
    num_workers: int = 0
    augment_flip: bool = False  # recover training: random horizontal flips
    augment_rot90: bool = False  # recover training: random multiples of 90 degrees (square inputs)
    # k >= 2: out-of-fold recovery; k recover nets each trained without one fold, so every
    # training image's Y (what the discriminate stage learns from) comes from a net that never saw it
    recover_folds: int = 0
    # best_val: keep the recover net of the epoch with the lowest L_Rec on the held-out normals
    recover_select: str = "last"
    # L_S normalisation: area (||g_X - g_Y||_F / hw) or width (c times that). With real
    # EfficientNet-Lite features "area" puts L_S at L_D's size (ratio 0.25-1.2) and "width" makes
    # it 14-63x L_D (docs/loss_balance.md); the ratio is logged every pass as ls_over_ld
    ls_normalisation: str = "area"


@dataclass
class EvalConfig:
    """Evaluation and decision threshold."""

    max_fpr: float = 0.3  # AUPRO integration limit
    # How the served threshold is set from the held-out normal scores (redi.core.operating_point):
    # a Gumbel law fitted to their lowest 80 %, read where a new good part's expected false-call
    # rate is false_call_target (docs/threshold_policy.md: the policy that held its target on
    # held-out normals and kept its recall with unusual normals among them). "max" is the rule
    # before policies: threshold_quantile of them.
    threshold_policy: str = "gumbel_trimmed"
    false_call_target: float = 0.01  # share of good parts the line accepts to re-inspect
    threshold_quantile: float = 1.0  # the "max" policy's quantile of the held-out normal scores
    threshold_margin: float = 1.0  # the policy's threshold times this margin
    # the operating point the line aims for: the report says whether the scores allow it and, if
    # not, which pair they do allow
    goal_recall: float = 0.95
    goal_false_call_rate: float = 0.02
    report_max_images: int = 200  # images drawn in the HTML report
    synthetic_per_image: int = 4  # synthetic defects drawn on each held-out normal for validation
    batch_size: int = 8


@dataclass
class DemoConfig:
    """The SYNTHETIC demo data of a demo line (``redi.data.demo.make_demo_line`` arguments)."""

    enabled: bool = False  # True: made in <workdir>/data/<line> when missing (only without a data path)
    n_train: int = 30
    n_test_good: int = 10
    n_test_defect: int = 20
    size: int = 256
    seed: int = 0


@dataclass
class LineConfig:
    """A product line: its name and where its data is."""

    name: str = ""  # "" = the line file's name
    description: str = ""
    data_path: str = ""  # the line's folder in MVTec-AD layout ("" = demo data in the work dir)
    data_repo: str = ""  # a DVC repository (path or git URL) that versions data_path; "" = a plain folder
    data_revision: str = ""  # its git revision; "" = the working copy (or the newest, for triggered runs)
    # the defect types an operator picks from on the review page (each a test/<type>/ folder of the data);
    # a supervisor adds a new type here (serving/review_app.py reads the line file from REDI_LINES_DIR)
    defect_types: list[str] = field(default_factory=lambda: ["defect"])
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass
class GateConfig:
    """The evaluation gate (``redi.ops.gate.GatePolicy``): minimums, and the tolerance against production."""

    min_image_auroc: float = 0.0
    min_pixel_auroc: float = 0.0
    min_aupro: float = 0.0
    tolerance: float = 0.01  # candidate >= production - tolerance on each gated metric
    # The decision at the served threshold, on the line's labelled test data: a model that
    # catches fewer defects than this, or flags more good parts, is refused whatever its AUROC
    min_recall: float = 0.8
    max_false_call_rate: float = 0.1
    # candidate recall >= production's - rate_tolerance and false calls <= production's +
    # rate_tolerance, each model at its own served threshold (one part of 20 is 0.05)
    rate_tolerance: float = 0.05
    # A shadow period before promotion (redi.ops.gate.promote_after_shadow): a passed candidate is put in
    # shadow and promoted only once the service logged its decisions on this many live requests / hours
    # of traffic (redi.ops.shadow); 0 and 0 = promote at once
    shadow_min_requests: int = 0
    shadow_min_hours: float = 0.0


@dataclass
class StepConfig:
    """Kubernetes settings of one pipeline step (Kubernetes quantities: "500m", "4Gi"; "" = none)."""

    cpu_request: str = "1"
    memory_request: str = "2Gi"
    cpu_limit: str = ""
    memory_limit: str = ""
    retries: int = 0  # retries on failure (transient faults: network, object store, node loss)
    accelerator: bool = False  # request the pipeline's accelerator and use its node selector / tolerations


def _step(cpu: str = "1", memory: str = "2Gi", retries: int = 0, accelerator: bool = False,
          memory_limit: str = "") -> Any:
    return field(default_factory=lambda: StepConfig(cpu, memory, "", memory_limit, retries, accelerator))


@dataclass
class PipelineStepsConfig:
    """Per-step Kubernetes settings, one entry per stage of the stage table (``redi.stages``,
    which CI checks against these names); their default resources are these."""

    validate_data: StepConfig = _step("1", "2Gi", retries=3)  # fetches data: network
    snapshot_data: StepConfig = _step("1", "2Gi", retries=3)
    precompute_selfmaps: StepConfig = _step("2", "4Gi")
    build_prompt_bank: StepConfig = _step("2", "4Gi")
    train_recover: StepConfig = _step("4", "16Gi", accelerator=True)
    train_discriminate: StepConfig = _step("4", "16Gi", accelerator=True)
    train_patchcore: StepConfig = _step("2", "8Gi")
    select_champion: StepConfig = _step("2", "8Gi")
    evaluate: StepConfig = _step("2", "8Gi")
    drift_reference: StepConfig = _step("2", "4Gi")
    gate: StepConfig = _step("2", "8Gi", retries=2)  # uploads to the object store
    package_bento: StepConfig = _step("1", "4Gi", retries=2)  # bentoml build + upload


@dataclass
class PipelineConfig:
    """How a line's Kubeflow pipeline runs: on a cluster, and what starts it."""

    store_secret: str = "redi-s3"  # Kubernetes secret whose keys REDI_S3_ENDPOINT/ACCESS_KEY/SECRET_KEY/BUCKET
    # become the steps' environment ("" = none: then a cluster run fails loudly at the gate)
    data_secret: str = ""  # Kubernetes secret with the data source's credentials, handed only to the steps that
    # fetch data (validate_data, snapshot_data); every key optional: REDI_GIT_TOKEN, REDI_GIT_USERNAME (git over
    # HTTPS), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (the DVC remote); "" = none (public data)
    image_digest: str = ""  # "sha256:<64 hex>" of the step image (REDI_IMAGE): the compiled YAML names image@digest
    schedule: str = "0 0 3 * * 0"  # the recurring run's cron (KFP: seconds minutes hours day month weekday)
    kfp_host: str = ""  # KFP endpoint for submit / schedule / drift-triggered runs ("" = run locally)
    experiment: str = "redi"
    namespace: str = ""
    accelerator_type: str = "nvidia.com/gpu"  # what the accelerator steps request
    accelerator_count: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)  # for accelerator steps, e.g. {gpu: "true"}
    tolerations: list[dict[str, str]] = field(  # for accelerator steps
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    workdir_pvc: str = ""  # PersistentVolumeClaim mounted at workdir_mount in every step ("" = none: no resume)
    workdir_mount: str = "/var/lib/redi/work"
    steps: PipelineStepsConfig = field(default_factory=PipelineStepsConfig)


@dataclass
class MonitorConfig:
    """The line's drift check: what ``redi monitor`` compares and when ``redi monitor schedule`` /
    ``cronjob`` run it (``docs/monitoring.md``)."""

    schedule: str = "0 0 * * * *"  # the scheduled check's cron, 6 fields as KFP reads it (hourly); the
    # Kubernetes CronJob takes the last 5 (its seconds field must be 0)
    last: int = 1000  # compare the latest N production rows (0: all)
    min_rows: int = 10  # fewer comparable production rows: no verdict, an error
    workspace: str = ""  # URL of the `evidently ui` service the scheduled runs go to ("" = none)
    evidently_secret: str = ""  # Kubernetes secret with REDI_EVIDENTLY_SECRET (the service's --secret), if any


@dataclass
class RediConfig:
    """Everything one run needs. ``profile`` records which named budget produced it."""

    profile: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    line: LineConfig = field(default_factory=LineConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def validate(self) -> "RediConfig":
        """Raise ConfigError for values that would fail later with an obscure message."""
        # names live in the builders' registries (imported here: they pull in torch, which
        # `redi config --help` and the CLI's start-up need not pay for)
        from redi.core.backbones import backbone_names
        from redi.core.operating_point import policy_names
        from redi.core.selfmaps import selfmap_names

        checks = [
            (self.model.selfmap.kind in selfmap_names(), f"model.selfmap.kind must be one of {selfmap_names()}"),
            (self.model.prompt in PROMPT_MODES, f"model.prompt must be one of {PROMPT_MODES}"),
            (self.model.prompt_codec in PROMPT_CODECS, f"model.prompt_codec must be one of {PROMPT_CODECS}"),
            (1 <= self.model.prompt_quality <= 100, "model.prompt_quality must be between 1 and 100"),
            (self.model.backbone in backbone_names(), f"model.backbone must be one of {backbone_names()}"),
            (self.data.image_size % 32 == 0 and self.data.image_size >= 64,
             "data.image_size must be a multiple of 32 and at least 64"),
            (self.model.recover.input_size % 32 == 0, "model.recover.input_size must be 0 or a multiple of 32"),
            (1 <= self.model.recover.depth <= 6, "model.recover.depth must be between 1 and 6"),
            (self.model.recover.precision in PRECISIONS, f"model.recover.precision must be one of {PRECISIONS}"),
            (self.data.aspect in ASPECTS, f"data.aspect must be one of {ASPECTS}"),
            (self.data.canvas == [] or (len(self.data.canvas) == 2
                                        and all(isinstance(v, int) and v >= 64 and v % 32 == 0 for v in self.data.canvas)),
             "data.canvas must be [] (measured when fitted) or [height, width], multiples of 32 and at least 64"),
            (self.data.canvas == [] or self.data.aspect == "native",
             "data.canvas is the input of data.aspect=native only; remove it or set data.aspect=native"),
            (self.model.selfmap.scale in SELFMAP_SCALES, f"model.selfmap.scale must be one of {SELFMAP_SCALES}"),
            (50.0 <= self.model.selfmap.scale_percentile <= 100.0, "model.selfmap.scale_percentile must be in [50, 100]"),
            (self.model.prompt_k >= 1, "model.prompt_k must be >= 1"),
            *self._method_checks(),
            (self.model.image_score in IMAGE_SCORES, f"model.image_score must be one of {IMAGE_SCORES}"),
            (0.0 < self.model.image_score_share <= 1.0, "model.image_score_share must be in (0, 1]"),
            (self.model.bottleneck_channels >= 0 and self.model.bottleneck_ratio > 0,
             "model.bottleneck_channels must be >= 0 and model.bottleneck_ratio > 0"),
            (0.0 <= self.model.bottleneck_dropout < 1.0, "model.bottleneck_dropout must be in [0, 1)"),
            (self.train.feature_noise >= 0.0, "train.feature_noise must be >= 0"),
            (set(self.model.prompt_transforms) <= set(PROMPT_TRANSFORMS),
             f"model.prompt_transforms may only hold {PROMPT_TRANSFORMS}"),
            (self.train.recover_folds == 0 or self.train.recover_folds >= 2,
             "train.recover_folds must be 0 (off) or >= 2"),
            (self.train.recover_select in RECOVER_SELECTIONS,
             f"train.recover_select must be one of {RECOVER_SELECTIONS}"),
            (self.train.ls_normalisation in LS_NORMALISATIONS,
             f"train.ls_normalisation must be one of {LS_NORMALISATIONS}"),
            (self.train.recover.steps >= 0 and self.train.discriminate.steps >= 0, "steps must be >= 0"),
            (all(s.min_passes >= 0 and s.max_minutes >= 0 for s in (self.train.recover, self.train.discriminate)),
             "train.<stage>.min_passes and max_minutes must be >= 0"),
            (self.eval.synthetic_per_image >= 1, "eval.synthetic_per_image must be >= 1"),
            (0.0 < self.data.val_fraction < 0.9,
             "data.val_fraction must be in (0, 0.9): held-out normal images set the decision threshold"),
            (0.0 < self.eval.threshold_quantile <= 1.0, "eval.threshold_quantile must be in (0, 1]"),
            (self.eval.threshold_policy in policy_names(),
             f"eval.threshold_policy must be one of {policy_names()}"),
            (0.0 < self.eval.false_call_target < 0.5,
             "eval.false_call_target must be in (0, 0.5): the share of good parts the line accepts to "
             "re-inspect, e.g. 0.01"),
            (0.0 < self.eval.goal_recall <= 1.0 and 0.0 <= self.eval.goal_false_call_rate < 1.0,
             "eval.goal_recall must be in (0, 1] and eval.goal_false_call_rate in [0, 1)"),
            (self.train.recover.epochs >= 0 and self.train.discriminate.epochs >= 0, "epochs must be >= 0"),
            *self._operations_checks(),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def _method_checks(self) -> list[tuple[bool, str]]:
        """Checks of the method, candidate and memory-bank settings."""
        # method names live in redi.methods' registry, above the core: redi.workflow.champion checks them
        core = self.model.patchcore
        return [
            (len(set(self.model.candidates)) == len(self.model.candidates),
             f"model.candidates names a method twice: {self.model.candidates}"),
            (len(self.model.fused.parts) >= 2 and "fused" not in self.model.fused.parts,
             "model.fused.parts must name at least two methods other than fused, e.g. [redi, patchcore]"),
            (bool(core.levels) and all(0 <= level <= 2 for level in core.levels) and len(set(core.levels)) == len(core.levels),
             "model.patchcore.levels must be distinct backbone levels among 0, 1, 2 (strides 4, 8, 16)"),
            (0.0 < core.coreset_ratio <= 1.0, "model.patchcore.coreset_ratio must be in (0, 1]"),
            (core.num_neighbors >= 1, "model.patchcore.num_neighbors must be >= 1"),
            (core.projection_dim >= 0 and core.max_patches >= 1,
             "model.patchcore.projection_dim must be >= 0 and model.patchcore.max_patches >= 1"),
        ]

    def _operations_checks(self) -> list[tuple[bool, str]]:
        """Checks of the line, gate and pipeline sections."""
        gate, pipe = self.gate, self.pipeline
        steps = [(name, getattr(pipe.steps, name)) for name in get_type_hints(PipelineStepsConfig)]
        bad_tolerations = [t for t in pipe.tolerations if set(t) - set(TOLERATION_KEYS)]
        return [
            (bool(self.line.defect_types) and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", t) and t != "good"
                                                  for t in self.line.defect_types),
             f"line.defect_types {self.line.defect_types} must list at least one folder name (letters, digits, "
             f"'_', '-'; not 'good'), e.g. [scratch, dent]"),
            (all(0.0 <= v <= 1.0 for v in (gate.min_image_auroc, gate.min_pixel_auroc, gate.min_aupro)),
             "gate minimums (gate.min_image_auroc, min_pixel_auroc, min_aupro) must lie in [0, 1]"),
            (0.0 <= gate.tolerance < 1.0, "gate.tolerance must lie in [0, 1)"),
            (all(0.0 <= v <= 1.0 for v in (gate.min_recall, gate.max_false_call_rate, gate.rate_tolerance)),
             "gate.min_recall, gate.max_false_call_rate and gate.rate_tolerance must lie in [0, 1]"),
            (gate.shadow_min_requests >= 0 and gate.shadow_min_hours >= 0,
             "gate.shadow_min_requests and gate.shadow_min_hours must be >= 0 (0: no shadow period required)"),
            (not pipe.schedule or len(pipe.schedule.split()) == 6,
             f"pipeline.schedule {pipe.schedule!r} must be a 6-field cron (seconds minutes hours day month "
             f"weekday, as KFP reads it), e.g. '0 0 3 * * 0' for Sundays at 03:00"),
            (all(step.retries >= 0 for _, step in steps), "pipeline.steps.<step>.retries must be >= 0"),
            (pipe.accelerator_count >= 0, "pipeline.accelerator_count must be >= 0"),
            (not bad_tolerations, f"pipeline.tolerations entries may only hold {TOLERATION_KEYS}; "
                                  f"got {bad_tolerations}"),
            (not self.line.demo.enabled or self.line.demo.n_train > 0, "line.demo.n_train must be > 0"),
            (len(self.monitor.schedule.split()) == 6 and self.monitor.schedule.split()[0] == "0",
             f"monitor.schedule {self.monitor.schedule!r} must be a 6-field cron with seconds 0 (seconds minutes "
             f"hours day month weekday), e.g. '0 0 * * * *' for hourly"),
            (self.monitor.last >= 0 and self.monitor.min_rows >= 1,
             "monitor.last must be >= 0 (0: all rows) and monitor.min_rows >= 1"),
        ]


def _paper() -> RediConfig:
    cfg = RediConfig(profile="paper")
    cfg.model.backbone = "wide_resnet50_2"  # the paper's; its weights must be on disk (redi.core.backbones)
    cfg.train.recover = StageTrainConfig(epochs=500, lr=5e-4, milestones=[200, 400], batch_size=32)
    cfg.train.discriminate = StageTrainConfig(epochs=300, lr=5e-3, milestones=[100, 200], batch_size=32)
    cfg.model.candidates = list(DEFAULT_CANDIDATES)
    return cfg


def _paper_lite() -> RediConfig:
    cfg = _paper()
    cfg.profile = "paper_lite"  # the paper's budget with the backbone that installs offline
    cfg.model.backbone = "efficientnet_lite2"
    return cfg


def _cpu() -> RediConfig:
    cfg = RediConfig(profile="cpu")
    # A budget in optimizer steps, so every line trains in the same time whatever its size; the
    # cheaper recover net (16-128 wide, 4 levels, at 128 px); random flips in recover training and
    # Reverse Distillation's 2x bottleneck: the best mean validation pixel AP (synthetic defects on
    # held-out normals, 3 seeds, both dev sets) of the options measured in docs/results.md.
    cfg.model.recover.base_width = 16
    cfg.model.recover.depth = 4
    cfg.model.recover.input_size = 128
    cfg.model.bottleneck_ratio = 2.0
    cfg.train.augment_flip = True
    # The floor of 20 passes changes nothing on lines up to ~60 images (they get 30-80 passes from the
    # steps) and gives a 760-image line 20 passes instead of 2.2; the caps bound a huge line's time.
    cfg.train.recover = StageTrainConfig(steps=240, lr=1e-3, milestones=[150, 210], batch_size=8, min_passes=20,
                                         max_minutes=12.0)
    cfg.train.discriminate = StageTrainConfig(steps=180, lr=5e-3, milestones=[90, 150], batch_size=8, min_passes=20,
                                              max_minutes=8.0)
    cfg.model.candidates = list(DEFAULT_CANDIDATES)
    return cfg


def _cpu_wide() -> RediConfig:
    cfg = _cpu()
    cfg.profile = "cpu_wide"  # the cpu budget with the paper-width recover net at 256 px
    cfg.model.recover.base_width = RecoverNetConfig.base_width
    cfg.model.recover.depth = RecoverNetConfig.depth
    cfg.model.recover.input_size = RecoverNetConfig.input_size
    return cfg


def _fast() -> RediConfig:
    cfg = _cpu()
    cfg.profile = "fast"
    cfg.model.backbone = "efficientnet_lite0"
    return cfg


def _tiny() -> RediConfig:
    cfg = RediConfig(profile="tiny")
    cfg.data.image_size = 128
    cfg.model.backbone = "efficientnet_lite0"
    cfg.model.recover.base_width = 8
    cfg.model.recover.depth = 3
    cfg.train.recover = StageTrainConfig(epochs=12, lr=3e-3, batch_size=4)
    cfg.train.discriminate = StageTrainConfig(epochs=15, lr=5e-3, batch_size=4)
    cfg.eval.report_max_images = 8
    return cfg


PROFILES = {"paper": _paper, "paper_lite": _paper_lite, "cpu": _cpu, "cpu_wide": _cpu_wide, "fast": _fast,
            "tiny": _tiny}


def profile_config(name: str) -> RediConfig:
    """Return a fresh config for a named profile."""
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]()


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML, JSON, KFP parameters, artifacts)."""
    return dataclasses.asdict(cfg)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Coerce a YAML / override value to the annotated type, with a clear error."""
    origin = get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "1", "yes", "on"):
                    return True
                if lowered in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return hint(value)
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            key_hint, value_hint = get_args(hint)
            return {_convert(k, key_hint, where): _convert(v, value_hint, f"{where}.{k}") for k, v in value.items()}
        if origin is list:
            (item_hint,) = get_args(hint)
            if isinstance(value, str):
                value = [v for v in value.strip("[]").split(",") if v.strip()]
            return [_convert(v, item_hint, where) for v in value]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from exc
    return value


def _merge(target: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = get_type_hints(type(target))
    for key, value in updates.items():
        where = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"unknown config key {where!r}; known keys here: {known}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where} is a section; give it as a mapping")
            _merge(current, value, prefix=f"{where}.")
        else:
            setattr(target, key, _convert(value, hints[key], where))


# Steps renamed when every stage got one name (redi.stages); line files may still use the old ones.
RENAMED_STEPS = {"version_data": "validate_data", "precompute_hog": "precompute_selfmaps"}


def _renamed_steps(data: dict[str, Any]) -> None:
    """Move ``pipeline.steps`` entries from an old step name to its new one, saying so."""
    steps = (data.get("pipeline") or {}).get("steps")
    if not isinstance(steps, dict):
        return
    for old, new in RENAMED_STEPS.items():
        if old in steps:
            if new in steps:
                raise ConfigError(f"pipeline.steps sets both {old!r} and its new name {new!r}; keep only {new!r}")
            print(f"note: pipeline.steps.{old} is now pipeline.steps.{new}; the old name still works for now",
                  file=sys.stderr)
            steps[new] = steps.pop(old)


def from_dict(data: dict[str, Any]) -> RediConfig:
    """Build a config from a (possibly partial) dict: the profile's defaults, then the values."""
    data = copy.deepcopy(data or {})
    _renamed_steps(data)
    cfg = profile_config(str(data.pop("profile", "cpu")))
    _merge(cfg, data)
    return cfg.validate()


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.seed=3", "model.prompt=none"]`` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        node = nested
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return nested


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML config file, with clear errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, profile: str | None = None,
                overrides: list[str] | None = None) -> RediConfig:
    """Load a config: profile defaults < YAML file < ``key=value`` overrides.

    ``profile`` (when given) wins over a profile named inside the file.
    """
    data = read_config_file(path) if path else {}
    if profile:
        data["profile"] = profile
    _deep_update(data, parse_overrides(overrides or []))
    return from_dict(data)


def save_config(cfg: RediConfig, path: str | Path) -> None:
    """Write the full config (every key, so a run can be repeated exactly) as YAML."""
    from redi.core.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
