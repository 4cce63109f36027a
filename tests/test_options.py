"""The config dataclasses are the one source of every setting: each option of ``pagedserve
scheduler``, ``executor`` and ``up`` is a config field, with that field's default, help text,
choices and environment variable, and ``to_flags`` passes what ``up`` parsed on unchanged."""
from dataclasses import fields

import click
import pytest

from pagedserve.common import options
from pagedserve.common.config import CPU_KV_CACHE_GB, ExecutorConfig, SchedulerConfig
from pagedserve.common.up import main as up
from pagedserve.executor_svc.cli import main as executor
from pagedserve.scheduler_svc.cli import main as scheduler

# Config fields that are no command's option, and why: the admission watermark is a margin
# inside the block manager (as in vLLM) that no deployment has a reason to move.
NOT_FLAGS = {"watermark"}
# `up` has no --scheduler: it connects its executor to the scheduler it starts.
NOT_UP = {"scheduler"}
# `up`'s own options, no service's setting: how long it waits for the services to be ready,
# and the HTTP gateway's port, switch and key.
UP_ONLY = {"ready_timeout", "http_port", "no_http", "api_key"}

COMMANDS = {"scheduler": (scheduler, [SchedulerConfig]),
            "executor": (executor, [ExecutorConfig]),
            "up": (up, [SchedulerConfig, ExecutorConfig])}


def config_fields(configs: list[type]) -> dict:
    return {f.name: f for config in configs for f in fields(config)}


def command_options(command: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if p.name not in UP_ONLY}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_its_config_fields_default_help_choices_and_envvar(name):
    command, configs = COMMANDS[name]
    by_name = config_fields(configs)
    for option in command_options(command).values():
        spec = by_name[option.name]
        assert option.default == spec.default, option.name
        assert option.help == spec.metadata["help"], option.name
        assert tuple(getattr(option.type, "choices", ())) == spec.metadata["choices"]
        assert option.envvar == spec.metadata["envvar"], option.name


@pytest.mark.parametrize("name", COMMANDS)
def test_every_config_field_is_an_option(name):
    command, configs = COMMANDS[name]
    left_out = NOT_FLAGS | (NOT_UP if name == "up" else set())
    assert set(command_options(command)) == set(config_fields(configs)) - left_out


def test_bool_fields_are_on_off_switches_named_as_before():
    switches = {o.name: (o.opts, o.secondary_opts)
                for o in command_options(up).values() if o.is_flag}
    assert switches == {
        "enable_prefix_caching": (["--prefix-caching"], ["--no-prefix-caching"]),
        "async_scheduling": (["--async-scheduling"], ["--no-async-scheduling"]),
        "enforce_eager": (["--enforce-eager"], ["--no-enforce-eager"]),
        "auth": (["--auth"], ["--no-auth"])}


def test_tensor_parallel_rank_and_master_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_TP_RANK", "1")
    monkeypatch.setenv("PAGEDSERVE_TP_MASTER", "10.0.0.1:29500")
    params = executor.make_context("executor", []).params
    assert (params["tp_rank"], params["tp_master"]) == (1, "10.0.0.1:29500")


def test_to_flags_passes_what_up_parsed_on_to_each_service():
    given = up.make_context("up", [
        "--block-size", "32", "--no-prefix-caching", "--preemption-mode", "swap",
        "--metrics-port", "9100", "--dtype", "bfloat16", "--kv-cache-gb", "0.5",
        "--enforce-eager", "--auth", "--log-format", "json"]).params
    for command, option_list in ((scheduler, options.SCHEDULER_OPTIONS),
                                 (executor, options.EXECUTOR_OPTIONS)):
        flags = options.to_flags(given, option_list + options.SHARED_OPTIONS)
        parsed = command.make_context(command.name, flags).params
        assert {k: v for k, v in parsed.items() if k in given} == \
            {k: given[k] for k in parsed if k in given}


def test_the_cpu_kv_pool_without_kv_cache_gb_is_the_size_its_help_states():
    assert ExecutorConfig().resolved_kv_cache_gb() == CPU_KV_CACHE_GB
    assert ExecutorConfig(kv_cache_gb=0.5).resolved_kv_cache_gb() == 0.5
    kv_cache_gb = command_options(executor)["kv_cache_gb"]
    assert f"[default: {CPU_KV_CACHE_GB:g} on CPU;" in kv_cache_gb.help
