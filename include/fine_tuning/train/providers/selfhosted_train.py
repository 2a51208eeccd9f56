"""The self-hosted trainer: LoRA SFT of a local chat model on the chat JSONL (transformers + peft + trl).

Run as its own process (``python -m fine_tuning.train.providers.selfhosted_train ...``): a detached
local process in local mode, the main process of the train pod on a GPU node in kubernetes mode.
It reports through a JSON status file that the provider, the operator and the trigger read:
``validating_files -> running -> succeeded | failed | cancelled`` (SIGTERM cancels), with the
step, the loss and, at the end, the adapter's path and the training metrics.

The module's top level imports only the standard library, so the provider can read status files
without torch installed; the heavy imports happen in :func:`train`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"


class DatasetFormatError(ValueError):
    """A line of the chat JSONL is not ``{"messages": [{"role", "content"}, ...]}``."""


class TrainingCancelled(RuntimeError):
    """SIGTERM arrived: the provider's ``cancel`` (or the pod being deleted)."""


def read_status(path: str | Path) -> dict[str, Any] | None:
    """The status file's content, or None when the trainer has not written one yet."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def write_status(path: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the status file, atomically (a reader never sees half a file)."""
    path = Path(path)
    status = read_status(path) or {}
    status.update(fields, updated_at=int(time.time()))
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, indent=2))
    tmp.replace(path)
    return status


def load_chat_jsonl(path: Path) -> list[dict[str, Any]]:
    """The examples as ``{"messages": [...]}`` rows (OpenAI's ``weight`` keys dropped)."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
                rows.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
            except (ValueError, KeyError, TypeError) as exc:
                raise DatasetFormatError(f"{path}:{number}: not a chat example ({exc})") from None
    if not rows:
        raise DatasetFormatError(f"{path} has no examples")
    return rows


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train the LoRA adapter; returns the metrics that are also written to ``metrics.json``."""
    # Never reach for a model hub: the base model is a configured local path (a volume).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    output_dir = Path(args.output_dir)
    status_file = Path(args.status_file)
    rows = load_chat_jsonl(Path(args.dataset))
    base = Path(args.base_model_path)
    if not (base / "config.json").exists():
        raise FileNotFoundError(f"training.selfhosted.base_model_path {base} has no config.json")
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    write_status(status_file, status="running", started_at=int(time.time()), examples=len(rows))

    history: list[dict[str, float]] = []
    eval_history: list[dict[str, float]] = []
    eval_rows = load_chat_jsonl(Path(args.eval_dataset)) if args.eval_dataset else None
    # About ten evaluations over the run: enough for the loss gate to see a trend.
    batches = max(1, -(-len(rows) // args.batch_size))
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(batches * args.epochs))
    eval_steps = max(1, total_steps // 10)

    class StatusCallback(TrainerCallback):
        """Each logged step goes to the status file (the wait shows progress) and the history."""

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
        ) -> None:
            if logs and "eval_loss" in logs:
                eval_history.append({"step": state.global_step, "loss": float(logs["eval_loss"])})
            if logs and "loss" in logs:
                history.append({"step": state.global_step, "loss": float(logs["loss"])})
                write_status(
                    status_file, step=state.global_step, max_steps=state.max_steps, loss=logs["loss"]
                )

    sft_config = SFTConfig(
        output_dir=str(output_dir / "trainer"),
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        dataset_num_proc=None,
        eval_strategy="steps" if eval_rows else "no",
        eval_steps=eval_steps if eval_rows else None,
        per_device_eval_batch_size=args.batch_size,
    )
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=sft_config,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[StatusCallback()],
    )
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    adapter_dir = output_dir / ADAPTER_DIR
    # The PEFT model SFTTrainer wrapped around the base (transformers' types do not know it).
    peft_model: Any = trainer.model
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    tokenizer.save_pretrained(adapter_dir)
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    adapter_bytes = sum(p.stat().st_size for p in adapter_dir.glob("adapter_model*.safetensors"))
    metrics = {
        "train_loss_first": history[0]["loss"] if history else None,
        "train_loss_last": history[-1]["loss"] if history else None,
        "loss_history": history,
        "eval_loss_history": eval_history,
        "trained_tokens": tokens,
        "train_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        "steps": trainer.state.global_step,
        "examples": len(rows),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "adapter_bytes": adapter_bytes,
        "trainable_parameters": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fine_tuning.train.providers.selfhosted_train")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--eval-dataset", default=None)
    parser.add_argument("--base-model-path", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--status-file", required=True)
    parser.add_argument("--model-reference", required=True)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train and keep the status file true to the end, whatever happens (0 on success)."""
    args = parse_args(argv)
    status_file = Path(args.status_file)
    status_file.parent.mkdir(parents=True, exist_ok=True)

    def on_sigterm(_signum: int, _frame: Any) -> None:
        raise TrainingCancelled(f"job {args.job_id} cancelled (SIGTERM)")

    signal.signal(signal.SIGTERM, on_sigterm)
    write_status(
        status_file,
        job_id=args.job_id,
        status="validating_files",
        pid=os.getpid(),
        created_at=(read_status(status_file) or {}).get("created_at") or int(time.time()),
    )
    try:
        metrics = train(args)
    except TrainingCancelled as exc:
        write_status(status_file, status="cancelled", finished_at=int(time.time()), error=str(exc))
        return 1
    except BaseException as exc:  # the status file must never stay "running" after we are gone
        write_status(
            status_file, status="failed", finished_at=int(time.time()), error=f"{type(exc).__name__}: {exc}"
        )
        raise
    write_status(
        status_file,
        status="succeeded",
        finished_at=int(time.time()),
        model_reference=args.model_reference,
        adapter_dir=str(Path(args.output_dir) / ADAPTER_DIR),
        trained_tokens=metrics["trained_tokens"],
        metrics_file=str(Path(args.output_dir) / METRICS_FILE),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
