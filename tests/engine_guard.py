"""``sglang.Engine`` (no HTTP server, so no HTTP gate) under --wait-for-initial-weights: the scheduler guard
alone must refuse generation until every parameter was written. Run as a script by test_e2e_gate.py (spawned
SGLang processes re-import ``__main__``, so an Engine lives in a real file); prints one JSON line per step."""

import json
import sys
import time

PROMPT = [1, 5, 6, 7, 8, 9, 10]


def attempt(engine) -> dict:
    try:
        out = engine.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 4, "temperature": 0.0})
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"output_ids": out.get("output_ids"), "finish_reason": out["meta_info"].get("finish_reason")}


def main(model_path: str) -> None:
    import sglang

    engine = sglang.Engine(
        model_path=model_path,
        load_format="dummy",
        checkpoint_engine_wait_weights_before_ready=True,
        device="cpu",
        max_total_tokens=4096,
        log_level="error",
    )
    try:
        print(json.dumps({"step": "before", **attempt(engine)}), flush=True)
        # SGLang's tensor path, inside a session: one parameter written is not a complete model
        from safetensors.torch import load_file

        tensors = load_file(f"{model_path}/model.safetensors")
        engine.begin_weight_update()
        engine.update_weights_from_tensor([("model.norm.weight", tensors["model.norm.weight"])])
        engine.end_weight_update()
        print(json.dumps({"step": "tensor-partial", **attempt(engine)}), flush=True)
        # SGLang fails a reload whose cache flush finds requests still being torn down (the refused ones above
        # may still be, on a loaded machine): the weights are loaded either way; try again, saying so
        messages = []
        for _ in range(10):
            ok, message = engine.update_weights_from_disk(model_path, load_format="auto")[:2]
            messages.append(message)
            if ok:
                break
            time.sleep(1)
        print(json.dumps({"step": "reload", "ok": ok, "messages": messages}), flush=True)
        print(json.dumps({"step": "after", **attempt(engine)}), flush=True)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
