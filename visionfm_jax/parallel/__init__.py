"""Device meshes (data, fsdp, tensor), global batches on them and the ZeRO-style sharding rules."""

from visionfm_jax.parallel.batch import (
                                         BATCH_AXES,
                                         BATCH_SPEC,
                                         BatchGeometry,
                                         batch_axes_of,
                                         batch_sharding,
                                         data_parallel_size,
                                         host_to_global,
)
from visionfm_jax.parallel.memory import bytes_per_device, tree_bytes_per_device
from visionfm_jax.parallel.mesh import AXES, data_mesh, make_mesh, mesh_shape
from visionfm_jax.parallel.sharding import (
                                         STRATEGY_SHARDS,
                                         activation_mesh,
                                         activation_rules,
                                         activation_sharding,
                                         batch_local,
                                         constrain_to,
                                         device_local,
                                         grad_specs,
                                         map_with_names,
                                         partition_spec,
                                         shard_shape,
                                         state_specs,
                                         tree_specs,
)
