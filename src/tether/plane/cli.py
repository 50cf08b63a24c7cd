"""``airflow tether ...``: the plane's admin commands.

The definitions below only describe arguments; each command body is imported
lazily from ``tether.plane.commands`` so ``airflow --help`` stays fast.
"""

from __future__ import annotations

from airflow.cli.cli_config import ActionCommand, Arg, GroupCommand, lazy_load_command

from tether.plane.values import DEFAULT_SLOTS, DEFAULT_TOKEN_SECRET_NAME

ARG_OUTPUT = Arg(
    ("-o", "--output"), help="Output format", choices=("table", "json"), default="table", metavar="(table, json)"
)
ARG_NAME = Arg(("--name",), help="Name of the token (unique among active tokens)", required=True)
ARG_DESCRIPTION = Arg(("--description",), help="What the token is for", default=None)
ARG_EXPIRES_IN_DAYS = Arg(
    ("--expires-in-days",), help="Days until the token expires (older form of --expires)", type=int, default=None
)
ARG_EXPIRES = Arg(
    ("--expires",),
    help="When the token expires: a duration (30m, 12h, 90d, 2w, 1d12h), a time (2027-01-31, 2027-01-31T18:00Z) "
    "or never (default: never)",
    default=None,
)
ARG_NEW_EXPIRY = Arg(
    ("--expires",),
    help="When the token expires from now on: a duration (30m, 12h, 90d), a time (2027-01-31T18:00Z) or never",
    default=None,
)
ARG_SCOPE = Arg(
    ("--scope",),
    help="A role the token's agents may serve: worker, dag-processor, triggerer or sentinel; give it once per role "
    "(default: worker)",
    action="append",
    choices=("worker", "dag-processor", "triggerer", "sentinel"),
    default=None,
)
ARG_BUNDLES = Arg(
    ("--bundles",),
    help="Comma-separated DAG bundles the token's dag-processor agents may write (default: any)",
    default=None,
)
ARG_TOKEN_ID = Arg(("token_id",), help="Id of the token (the part after tether_)")
ARG_AGENT = Arg(("agent",), help="Name or id of the agent")
ARG_REASON = Arg(("--reason",), help="Why, for the people who look later", default=None)
ARG_CIDRS = Arg(("cidrs",), help="IPv4 or IPv6 addresses or CIDR ranges", nargs="+")
ARG_CIDRS_OPTIONAL = Arg(("cidrs",), help="IPv4 or IPv6 addresses or CIDR ranges (none: allow any)", nargs="*")
ARG_NAMESPACE = Arg(("--namespace",), help="Kubernetes namespace the agents go to", default="tether-agents")
ARG_QUEUES = Arg(("--queues",), help="Comma-separated queues the agents serve", default="default")
ARG_SLOTS = Arg(("--slots",), help="Task slots per agent", type=int, default=DEFAULT_SLOTS)
ARG_TOKEN_SECRET = Arg(
    ("--agent-token-secret-name",),
    help="Secret in the namespace that holds the agent token under the key `token`",
    default=DEFAULT_TOKEN_SECRET_NAME,
)
ARG_PREFIX = Arg(
    ("--resource-name-prefix",), help="Prefix of every object's name (default: the release name)", default=""
)
ARG_SECRET_BACKEND = Arg(
    ("--secret-backend",), help="Class of the agents' secrets backend (default: left for you to fill in)", default=""
)
ARG_XCOM_BACKEND = Arg(
    ("--xcom-backend",), help="Class of the agents' XCom backend (default: left for you to fill in)", default=""
)
ARG_LIMIT = Arg(("--limit",), help="How many entries, newest first", type=int, default=100)
ARG_TARGET_TYPE = Arg(("--target-type",), help="Only entries about: token, agent or allowed_ip_ranges", default=None)
ARG_TARGET_ID = Arg(("--target-id",), help="Only entries about this token or agent id", default=None)


def _command(name: str, help: str, func: str, *args: Arg) -> ActionCommand:
    return ActionCommand(name=name, help=help, func=lazy_load_command(f"tether.plane.commands.{func}"), args=args)


TOKEN_COMMANDS = (
    _command(
        "create",
        "Create an agent token and print it once",
        "tokens_create",
        ARG_NAME,
        ARG_DESCRIPTION,
        ARG_SCOPE,
        ARG_BUNDLES,
        ARG_EXPIRES,
        ARG_EXPIRES_IN_DAYS,
        ARG_OUTPUT,
    ),
    _command("list", "List agent tokens (never their secrets)", "tokens_list", ARG_OUTPUT),
    _command("show", "Show one agent token", "tokens_show", ARG_TOKEN_ID, ARG_OUTPUT),
    _command(
        "update",
        "Change when an agent token expires (sooner, later, never) or its description",
        "tokens_update",
        ARG_TOKEN_ID,
        ARG_NEW_EXPIRY,
        ARG_DESCRIPTION,
        ARG_OUTPUT,
    ),
    _command(
        "revoke",
        "Revoke an agent token; agents using it are refused and their tasks failed",
        "tokens_revoke",
        ARG_TOKEN_ID,
        ARG_OUTPUT,
    ),
)

AGENT_COMMANDS = (
    _command("list", "List agents with their health", "agents_list", ARG_OUTPUT),
    _command("show", "Show one agent", "agents_show", ARG_AGENT, ARG_OUTPUT),
    _command(
        "cordon", "Give an agent no new work; running tasks finish", "agents_cordon", ARG_AGENT, ARG_REASON, ARG_OUTPUT
    ),
    _command("uncordon", "Give a cordoned agent work again", "agents_uncordon", ARG_AGENT, ARG_OUTPUT),
    _command(
        "delete",
        "Delete an agent's record; a live agent registers again unless its token is revoked",
        "agents_delete",
        ARG_AGENT,
        ARG_OUTPUT,
    ),
    _command(
        "values",
        "Print a values.yaml for the tether-agent Helm chart, pre-filled for this plane",
        "agents_values",
        ARG_NAMESPACE,
        ARG_QUEUES,
        ARG_SLOTS,
        ARG_TOKEN_SECRET,
        ARG_PREFIX,
        ARG_SECRET_BACKEND,
        ARG_XCOM_BACKEND,
    ),
)

ARG_BUNDLE = Arg(("bundle",), help="Name of the DAG bundle")

BUNDLE_COMMANDS = (
    _command("list", "List the DAG bundles agents parse, and the token that owns each", "bundles_list", ARG_OUTPUT),
    _command(
        "release",
        "Give a bundle up: the next agent to sync it owns it (its DAGs stay until then)",
        "bundles_release",
        ARG_BUNDLE,
    ),
)

RANGE_COMMANDS = (
    _command("list", "List the ranges agents may call from", "ranges_list", ARG_OUTPUT),
    _command("set", "Replace the allowed ranges (none: any address)", "ranges_set", ARG_CIDRS_OPTIONAL, ARG_OUTPUT),
    _command("add", "Allow more ranges", "ranges_add", ARG_CIDRS, ARG_OUTPUT),
    _command("remove", "Stop allowing ranges", "ranges_remove", ARG_CIDRS, ARG_OUTPUT),
)


def get_cli_commands() -> list[GroupCommand]:
    return [
        GroupCommand(
            name="tether",
            help="Manage Tether remote execution agents",
            subcommands=(
                GroupCommand(name="tokens", help="Manage agent tokens", subcommands=TOKEN_COMMANDS),
                GroupCommand(name="agents", help="Inspect and manage agents", subcommands=AGENT_COMMANDS),
                GroupCommand(name="bundles", help="DAG bundles parsed by agents", subcommands=BUNDLE_COMMANDS),
                GroupCommand(
                    name="allowed-ip-ranges", help="Restrict where agents may call from", subcommands=RANGE_COMMANDS
                ),
                _command(
                    "audit",
                    "Read the audit log of token, agent and IP range changes",
                    "audit",
                    ARG_LIMIT,
                    ARG_TARGET_TYPE,
                    ARG_TARGET_ID,
                    ARG_OUTPUT,
                ),
            ),
        )
    ]
