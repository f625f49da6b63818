"""The AOT memory plan (`python -m visionfm_jax.bench.memory_plan`) on the 8 simulated test devices."""

import json

from visionfm_jax.bench import memory_plan


def test_plan_is_the_state_shard_plus_batch_shard_plus_temporaries(capsys):
  code = memory_plan.main(["memory_plan", "--config=configs/vit_huge.py:demo", "--devices=8", "--hbm_gib=1e-6",
                           "--config.model.variant=pico/4", "--config.model.image_size=16",
                           "--config.data.image_size=16", "--config.global_batch_size=16",
                           "--config.strategy=zero3"])
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and result["strategy"] == "zero3"
  per_device = 16 // 8
  batch = per_device * (16 * 16 * 3 + 4 + 1)  # uint8 images, int32 labels, uint8 flip bits (device_augment)
  step = 4  # the int32 step counter
  # What the compiled step takes per device is exactly the analytic zero3 shard of the state plus the batch.
  assert result["argument_bytes"] == result["state_params_bytes"] + result["state_opt_bytes"] + step + batch
  assert result["alias_bytes"] > 0 and result["temp_bytes"] > 0  # the donated state is reused for the new one
  assert result["total_bytes"] == (result["argument_bytes"] + result["output_bytes"] - result["alias_bytes"]
                                   + result["temp_bytes"])
  assert result["fits"] is False and result["hbm_bytes"] == int(1e-6 * 2 ** 30)
  assert "fits: False" in out
