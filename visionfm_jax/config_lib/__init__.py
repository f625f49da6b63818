"""The config: its schema, one row per field with its default, domain and doc (rows.py; the sections in schema.py,
the model families in model_schema.py, what a task adds in task_schema.py), the domains (domains.py), the checks
of a config alone (checks.py), what a resume may change (resume_rules.py), loading a config file (loading.py) and
the lines recipes share (recipes.py; the CPU demo and small data sets: demo.py) and the fields a recipe leaves to
the run (sizing.py). Callers use the names below, from this package.

Configs are `ml_collections.ConfigDict`s. A field's domain (a numeric range, or a set of names) sits on its row,
found by the config's own model family and task, and `check` checks it (and refuses a field without a row). The
package is data: it imports nothing of visionfm_jax but its errors. The checks between fields live with their owners
(data/loader/checks.py, parallel/checks.py, training/optim.py, training/init_from.py), and training/checks.py
`validate` runs them all.
"""

from visionfm_jax.config_lib.checks import check, check_domains, domain_of
from visionfm_jax.config_lib.demo import DEMO_DATA, cpu_demo, small_data
from visionfm_jax.config_lib.domains import (
  ALL_OR_COUNT,
  COUNT,
  FRACTION,
  NON_NEGATIVE,
  NON_NEGATIVE_INT,
  OPEN_FRACTION,
  POSITIVE,
  RATE,
  SIZED,
  Choices,
  Domain,
  TransformerSize,
  custom_size,
  staged_size,
)
from visionfm_jax.config_lib.loading import check_override, load
from visionfm_jax.config_lib.model_schema import (
  ACTIVATIONS,
  ATTENTION,
  EXTRA_NORM_SCOPES,
  LOGIT_SCALE_INIT,
  MIM_VIEWS,
  REMAT_POLICIES,
  SWINV2_SIZES,
  TEXT_POOLS,
  TEXT_SIZES,
  TOWER_HEADLESS,
  TOWER_SHARED_FIELDS,
  VIT_POOLS,
  WINDOW_ATTENTION,
  model_rows,
)
from visionfm_jax.config_lib.recipes import finetune_backbone, full_scale_run
from visionfm_jax.config_lib.resume_rules import (
  FREE,
  MISSING_CONFIG,
  OPT_IN,
  REFUSED,
  RESUME_RULES,
  allowed_changes,
  resume_changes,
  resume_kind,
)
from visionfm_jax.config_lib.rows import Field, defaults, row_at
from visionfm_jax.config_lib.schema import (
  COMPUTE_DTYPES,
  RANDAUGMENT_MAX_MAGNITUDE,
  STRATEGIES,
  STRATEGY_ALIASES,
  TRACKERS,
  ZERO_STAGES,
  base_config,
  complete,
  config_rows,
  fields,
  head_config,
  model_config,
  report_to,
  schema_of,
  set_fields,
  set_paths,
)
from visionfm_jax.config_lib.sizing import (
  MACHINE_FIELDS,
  NUM_CLASSES,
  fill_machine,
  fill_steps,
  fill_value,
  fill_zeroshot,
  is_sized,
)
from visionfm_jax.config_lib.task_schema import TASK_SECTIONS
