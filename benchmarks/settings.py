"""What `make bench` runs: the sizes of its full, quick and micro (test) forms, in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

METHODS = ("bt", "margin", "label_smoothing", "point", "aplot")


@dataclass
class BenchSettings:
    """One benchmark form. Every training run is the real `make rm` (pipelines.rm) on the embedded
    recipe with these overrides; the results file records them."""

    name: str
    seeds: tuple[int, ...]
    noise_levels: tuple[float, ...]
    gammas: tuple[float, ...]                  # the APLOT gamma sweep (noise 0)
    scales: tuple[float, ...]                  # the APLOT margin_scale sweep (noise 0)
    max_steps: int                             # steps of 16 pairs; n_train = max_steps * 16 (one epoch)
    warmup_steps: int
    n_eval: int                                # pairs per final eval set (test_id, test_ood)
    eval_steps: int                            # the convergence curve: test_id accuracy every eval_steps
    curve_eval_pairs: int
    target_accuracy: float                     # convergence: steps until the curve first reaches this
    workers: int = 2                           # trainings at once, one thread each; 0: in this process
    methods: tuple[str, ...] = METHODS
    # loss_type=margin needs a margin: a constant about APLOT's average margin early in training
    # (its logged loss_margin_mean), so the two differ in adaptivity rather than in size.
    margin_value: float = 0.2
    recipe: str = "recipes/rm/embedded.yaml"
    # The regime: reward models trained from scratch (the recipe's default starts from the SFT policy of
    # the model lineage), at the learning rate tuned for it.
    init_from: str = "scratch"
    learning_rate: float = 5e-4
    # Best-of-N through pipelines.bon on the bench's own bt and aplot models (noise 0).
    bon_prompts: int = 64
    bon_samples: int = 64
    bon_seeds: tuple[int, ...] = (0,)
    # Speed: repeats of each side-by-side measurement, and their sizes.
    step_repeats: int = 3
    step_steps: int = 60
    step_threads: tuple[int, ...] = (1, 0)     # torch threads of the step-time runs; 0: torch's default
    sinkhorn_reps: int = 300
    score_sequences: int = 2048
    score_repeats: int = 5
    gen_prompts: int = 64
    gen_samples: int = 64
    gen_repeats: int = 3                       # 0: no generation measurement (its engine alone takes ~30 s)
    gen_medium_prompts: int = 8                # prompts (x gen_samples) for the larger model; 0: skip it
    extra: dict = field(default_factory=dict)  # bon_backend: another Best-of-N backend than the recipe's

    def to_dict(self) -> dict:
        return asdict(self)


FULL = BenchSettings(
    name="full", seeds=(0, 1, 2), noise_levels=(0.0, 0.2, 0.4), gammas=(0.0, 0.1, 0.3, 0.5, 0.9, 1.0),
    scales=(1.0, 4.0, 16.0), max_steps=600, warmup_steps=100, n_eval=1000, eval_steps=25, curve_eval_pairs=400,
    target_accuracy=0.8, bon_prompts=256, bon_seeds=(0, 1, 2))

# Every section still runs, with one seed, fewer steps and a coarser sweep.
QUICK = BenchSettings(
    name="quick", seeds=(0,), noise_levels=(0.0, 0.2, 0.4), gammas=(0.0, 0.1, 0.5, 1.0), scales=(1.0, 16.0),
    max_steps=300, warmup_steps=50, n_eval=500, eval_steps=25, curve_eval_pairs=300, target_accuracy=0.8,
    step_repeats=2, step_steps=30, sinkhorn_reps=200, score_sequences=1024, score_repeats=3, gen_prompts=16,
    gen_repeats=2, gen_medium_prompts=2)

# The machinery end to end in well under a minute (tests/test_benchmarks.py): numbers mean nothing.
MICRO = BenchSettings(
    name="micro", seeds=(0,), noise_levels=(0.0, 0.4), gammas=(0.1, 1.0), scales=(1.0,), max_steps=4,
    warmup_steps=1, n_eval=32, eval_steps=2, curve_eval_pairs=16, target_accuracy=0.5, methods=("bt", "aplot"),
    bon_prompts=4, bon_samples=4, step_repeats=1, step_steps=3, step_threads=(1,), sinkhorn_reps=5, score_sequences=64,
    score_repeats=1, gen_repeats=0, workers=0, extra={"bon_backend": "transformers"})

FORMS = {"full": FULL, "quick": QUICK, "micro": MICRO}
