"""decode_flow: ``flows.decoding.decode_tokens`` as a recorded task, with a table artifact of
the first decoded images' MSE / PSNR."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from vqtok.flows.decoding import decode_tokens
from vqtok.flows.retry import retry_on_io_error
from vqtok.tokenizer.health import quality_line


@task(name="decode-tokens", retries=1, retry_condition_fn=retry_on_io_error)
def decode_task(tokens: str, checkpoint: str, out: str, split: str | None, limit: int,
                picture_count: int, device: str) -> dict[str, Any]:
    result = decode_tokens(tokens, checkpoint, out, split, limit, picture_count, device,
                           logger=get_run_logger())
    table = result.pop("table", None)
    if table:
        create_table_artifact(
            key="vqtok-decode", table=table,
            description=f"Per-image MSE / PSNR of the first {len(table)} decoded "
                        f"images (mean over {result['images']}: MSE {result['mse']:.5f}, "
                        f"PSNR {result['psnr']:.2f} dB)")
    return result


@flow(name="decode")
def decode_flow(
    tokens: str, checkpoint: str, out: str, split: str | None = None, limit: int = 1000,
    picture_count: int = 32, device: str = "auto",
) -> dict[str, Any]:
    """Decode up to ``limit`` rows; PSNR is from the mean MSE over them."""
    result = decode_task(tokens, checkpoint, out, split, limit, picture_count, device)
    if "psnr" in result:
        get_run_logger().info(f"decoded {result['images']} images: mse {result['mse']:.5f}, "
                              f"{quality_line(result)} -> {result['picture']}")
    return result
