"""What `make bench` runs: the sizes of its full, quick and micro (test) forms, in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

METHODS = ("bt", "margin", "label_smoothing", "point", "aplot")


@dataclass
class BenchSettings:
    """One benchmark form. Every training run is the real `make rm` (pipelines.rm) on the embedded
    recipe with these overrides; the results file records them.

    Sections (each run is named after its section, see benchmarks.quality.plan):
    - main: the pretrained lineage (reward model from the SFT policy, the recipe's default), every method
      at every noise level; its noise-0 runs log the convergence curve; the gamma and margin_scale sweeps;
    - scratch: the same reward model built from its config, for `scratch_methods` and `scratch_noise_levels`;
    - overfit: 1/`overfit_fraction` of the pairs for `overfit_epochs` epochs (as many steps as a main run),
      training-pair and held-out accuracy after every epoch;
    - Best-of-N and PPO on the main regime's bt and aplot models at noise 0."""

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
    preset: str = "recipes/models/tiny-qwen2"  # the model preset of every stage (`--preset`)
    # The main regime starts from the lineage's SFT policy at the recipe's fine-tuning rate (600 steps of
    # it settle by step ~200 here); from scratch, the rate tuned for that regime.
    learning_rate: float = 1e-4
    scratch_learning_rate: float = 5e-4
    sweep_seeds: int = 3                       # the first this many seeds run the gamma and scale sweeps
    scratch_methods: tuple[str, ...] = ("bt", "aplot")
    scratch_noise_levels: tuple[float, ...] = (0.0, 0.2)
    # 1/24 of the pairs (400, 25 steps an epoch) for 24 epochs: here held-out accuracy peaks within a few
    # epochs and then falls while the training pairs approach 100 % (at 1/8 for 8 epochs the gap stayed ~4 %).
    overfit_fraction: int = 24
    overfit_epochs: int = 24
    overfit_methods: tuple[str, ...] = ("bt", "aplot")
    overfit_noise_levels: tuple[float, ...] = (0.0, 0.2)
    # Best-of-N through pipelines.bon on the main regime's bt and aplot models (noise 0), one sampling pass.
    bon_prompts: int = 64
    bon_samples: int = 64
    bon_seeds: tuple[int, ...] = (0,)
    # PPO through pipelines.ppo on the main regime's bt and aplot models (noise 0), the PPO seed = the
    # reward model's; `ppo_episodes` of the recipe's 64 a rollout (40 updates: 2560).
    ppo_seeds: tuple[int, ...] = (0,)
    ppo_episodes: int = 2560
    ppo_recipe: str = "recipes/ppo/embedded.yaml"
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
    name="full", seeds=(0, 1, 2, 3, 4), noise_levels=(0.0, 0.1, 0.2, 0.3, 0.4), gammas=(0.0, 0.1, 0.3, 0.5, 0.9, 1.0),
    scales=(1.0, 4.0, 16.0), max_steps=600, warmup_steps=100, n_eval=1000, eval_steps=25, curve_eval_pairs=400,
    target_accuracy=0.8, bon_prompts=128, bon_samples=256, bon_seeds=(0, 1, 2, 3, 4), ppo_seeds=(0, 1, 2))

# Every section still runs, with one seed (so no verdicts), fewer steps and coarser sweeps.
QUICK = BenchSettings(
    name="quick", seeds=(0,), noise_levels=(0.0, 0.2, 0.4), gammas=(0.0, 0.1, 1.0), scales=(1.0, 16.0),
    max_steps=300, warmup_steps=50, n_eval=500, eval_steps=25, curve_eval_pairs=300, target_accuracy=0.8,
    overfit_fraction=12, overfit_epochs=12, overfit_noise_levels=(0.0,), bon_prompts=32, bon_samples=256,
    ppo_episodes=1024, step_repeats=2, step_steps=30, sinkhorn_reps=200, score_sequences=1024, score_repeats=3,
    gen_prompts=16, gen_repeats=2, gen_medium_prompts=2)

# The machinery end to end in about a minute (tests/test_benchmarks.py): numbers mean nothing.
MICRO = BenchSettings(
    name="micro", seeds=(0,), noise_levels=(0.0, 0.4), gammas=(0.1, 1.0), scales=(1.0,), max_steps=4,
    warmup_steps=1, n_eval=32, eval_steps=2, curve_eval_pairs=16, target_accuracy=0.5, methods=("bt", "aplot"),
    scratch_noise_levels=(0.0,), overfit_fraction=2, overfit_epochs=2, overfit_noise_levels=(0.0,), bon_prompts=4,
    bon_samples=4, ppo_episodes=128, step_repeats=1, step_steps=3, step_threads=(1,), sinkhorn_reps=5,
    score_sequences=64, score_repeats=1, gen_repeats=0, workers=0,
    extra={"bon_backend": "transformers", "ppo_args": ["--n_prompts", "256", "--n_eval_prompts", "8"]})

FORMS = {"full": FULL, "quick": QUICK, "micro": MICRO}
