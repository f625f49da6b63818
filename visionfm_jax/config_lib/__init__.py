"""The config: its sections and defaults (schema.py), the CPU demo helper (demo.py), loading a config file
(loading.py), the fields' domains (domains.py) and what a resume may change (resume_rules.py). Callers use the
names below, from this package.

Configs are `ml_collections.ConfigDict`s. Every field with a domain (a numeric range, or a set of names) has it in
one table, `DOMAINS`, which `check` checks. The package is data: it imports nothing of visionfm_jax but its
errors. The checks between fields live with their owners (data/loader/checks.py, parallel/checks.py,
training/optim.py), and training/checks.py `validate` runs them all.
"""

from visionfm_jax.config_lib.demo import DEMO_DATA, cpu_demo, small_data
from visionfm_jax.config_lib.domains import (
                                             ALL_OR_COUNT,
                                             COUNT,
                                             DOMAINS,
                                             FRACTION,
                                             NON_NEGATIVE,
                                             NON_NEGATIVE_INT,
                                             ORDERED_PAIRS,
                                             POSITIVE,
                                             RATE,
                                             Choices,
                                             Domain,
                                             check,
                                             check_domains,
                                             rule_of,
)
from visionfm_jax.config_lib.loading import check_override, load
from visionfm_jax.config_lib.resume_rules import (
                                             FREE,
                                             OPT_IN,
                                             REFUSED,
                                             RESUME_RULES,
                                             allowed_changes,
                                             resume_changes,
                                             resume_kind,
)
from visionfm_jax.config_lib.schema import (
                                             COMPUTE_DTYPES,
                                             LOGIT_SCALE_INIT,
                                             RANDAUGMENT_MAX_MAGNITUDE,
                                             REMAT_POLICIES,
                                             STRATEGIES,
                                             STRATEGY_ALIASES,
                                             TOWER_HEADLESS,
                                             TOWER_SHARED_FIELDS,
                                             TRACKERS,
                                             ZERO_STAGES,
                                             augment_config,
                                             base_config,
                                             data_config,
                                             eval_config,
                                             fields,
                                             health_config,
                                             init_from_fields,
                                             loop_fields,
                                             model_config,
                                             optim_config,
                                             parallel_fields,
                                             precision_config,
                                             probe_config,
                                             report_to,
                                             resume_config,
                                             run_fields,
                                             set_fields,
                                             set_paths,
                                             tracking_fields,
)
