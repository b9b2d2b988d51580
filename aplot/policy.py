"""The embedded policy: a tiny Qwen2 causal LM fine-tuned with TRL's SFTTrainer on the world's
responses of mixed quality, so its samples spread in gold reward and picking the best can help."""

from __future__ import annotations

from pathlib import Path

from aplot.reward_model import has_weights

TINY_CONFIG = "recipes/models/tiny-qwen2"


def ensure_embedded_policy(out_dir: str, seed: int = 0, n_examples: int = 20000, batch_size: int = 32,
                           learning_rate: float = 1e-3) -> str:
    """Train the embedded policy into `out_dir` unless a finished one is there; returns the path."""
    if has_weights(out_dir):
        return out_dir
    import random

    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    from aplot.data import world

    tokenizer = world.build_tokenizer(seed)
    rng = random.Random(f"aplot-policy/{seed}")
    rows = []
    for _ in range(n_examples):
        c = world.sample_constraints(rng, "train")
        rows.append({"prompt": world.format_prompt(c), "completion": " " + " ".join(world.sample_response(rng, c))
                     + tokenizer.eos_token})
    config = AutoConfig.from_pretrained(TINY_CONFIG)
    config.update({"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                   "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None, "architectures": None})
    set_seed(seed)  # the Trainer seeds only after the weights below are initialised
    model = AutoModelForCausalLM.from_config(config)
    args = SFTConfig(output_dir=str(Path(out_dir) / "sft"), per_device_train_batch_size=batch_size,
                     learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=20, num_train_epochs=1,
                     logging_steps=50, save_strategy="no", report_to="none", bf16=False, seed=seed,
                     max_length=64, completion_only_loss=True)
    trainer = SFTTrainer(model, args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    model.generation_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    # Saved aside, then moved in weights-last: has_weights() above must never find a half-saved policy.
    from aplot.outputs import STAGING, publish_model

    trainer.save_model(str(Path(out_dir) / STAGING))
    publish_model(Path(out_dir) / STAGING, out_dir)
    return out_dir
