"""What ``python -m litespark_jax.sft`` / ``litespark_jax.dpo`` do: build the trainer, say what will run, run the
pretraining loop with it, and summarize (loss, tokens/s, energy, and DPO's reward metrics before and after)."""

from __future__ import annotations

import json
import os

import jax

from litespark_jax.config import Config
from litespark_jax.energy import EnergyWindow


def run(kind: str, config: Config) -> dict:
    from litespark_jax.posttrain.trainer import DPOTrainer, SFTTrainer, resumes
    from litespark_jax.train.loop import train
    from litespark_jax.train.run_dir import make_run_dir

    m, t, p = config.model, config.train, config.posttrain
    main_process = jax.process_index() == 0
    resuming = resumes(config)
    trainer = (SFTTrainer if kind == "sft" else DPOTrainer)(config)
    if main_process:
        make_run_dir(config)
        unit = "sequences (2 per pair)" if kind == "dpo" else "packed windows" if p.pack else "conversations"
        print(f"{kind}: model {m.num_params() / 1e6:.2f}M params, {m.num_layers} layers, d_model {m.d_model}; "
              f"{t.steps} steps x {t.global_batch_size} {unit} x {t.seq_len} tokens on {jax.device_count()} "
              f"{jax.devices()[0].platform} device(s); run dir {t.run_dir}\n"
              f"template {p.template}, tokenizer {trainer.tokenizer.name}, starting weights "
              f"{p.init_from or 'random init'}{' (not read: the run resumes from a checkpoint)' if resuming else ''}\n"
              f"train data {trainer.train_file}: {trainer.stats.summary()}"
              + (f"\neval data {trainer.eval_file}: {trainer.eval_stats.summary()}" if trainer.eval_stats else "")
              + (f"\nDPO: {p.loss_type} loss, beta {p.beta}, label smoothing {p.label_smoothing}, reference "
                 f"{p.reference}" if kind == "dpo" else ""), flush=True)
    summary: dict = {"kind": kind, "train_stats": vars(trainer.stats)}
    if kind == "dpo":
        initial = trainer.initial_params()
        summary["before"] = trainer.evaluate_pairs(initial)
        summary["train_before"] = trainer.evaluate_pairs(initial, trainer.pairs, max_batches=t.eval_batches)
        del initial  # a reference held here kept the starting weights on the device for the whole run
    energy = EnergyWindow(clock_interval_s=1.0)  # the SM clock too: at the power limit it says why a run is slower
    energy.start()
    result = train(config, trainer=trainer)
    joules, watts = energy.stop()
    final = result.history[-1] if result.history else {}
    throughput = [h["tokens_per_second"] for h in result.history if "tokens_per_second" in h]
    summary.update(final=final, eval=result.eval_history[-1] if result.eval_history else None,
                   tokens_per_second=sum(throughput) / len(throughput) if throughput else None,
                   energy_joules=joules, average_watts=watts, sm_clock_mhz=energy.sm_clock_mhz,
                   power_capped=energy.power_capped)
    if kind == "dpo":
        summary["after"] = trainer.evaluate_pairs(result.state.params)
        summary["train_after"] = trainer.evaluate_pairs(result.state.params, trainer.pairs,
                                                        max_batches=t.eval_batches)
    if main_process:
        lines = [f"final train loss {final['loss']:.4f}"] if "loss" in final else []  # none: no step left to take
        no_eval_file = "" if trainer.eval_file else " (the train file's: posttrain.eval_file is not set)"
        if kind == "sft" and result.eval_history:
            last = result.eval_history[-1]
            lines.append(f"eval loss{no_eval_file} at step {last['step']}: {last['eval_loss']:.4f} nats per "
                         f"assistant token")
        if kind == "dpo":
            for name, before, after in (("train pairs", "train_before", "train_after"),
                                        ("eval pairs" + no_eval_file, "before", "after")):
                b, a = summary[before], summary[after]
                lines.append(f"{name} ({int(a['pairs'])}): reward accuracy {b['reward_accuracy']:.3f} -> "
                             f"{a['reward_accuracy']:.3f}, margin {b['reward_margin']:.4f} -> "
                             f"{a['reward_margin']:.4f}, KL proxy {a['kl_proxy']:.4f} nats/sequence, loss "
                             f"{b['loss']:.4f} -> {a['loss']:.4f}")
        if summary["tokens_per_second"]:
            lines.append(f"throughput {summary['tokens_per_second']:,.0f} tokens/s")
        if joules is not None:
            clock = (f", SM clock {energy.sm_clock_mhz:.0f} MHz, power-capped in {energy.power_capped:.0%} of "
                     "samples" if energy.sm_clock_mhz is not None else "")
            lines.append(f"energy {joules:.0f} J ({watts:.0f} W average{clock})")
        print("\n".join(lines), flush=True)
        if result.history:  # a run with no step left to take keeps the summary of the run that trained
            with open(os.path.join(t.run_dir, f"{kind}_summary.json"), "w") as f:
                json.dump(summary, f, indent=2, default=float)
    summary["result"] = result
    return summary
