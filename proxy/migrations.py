"""The SQL the proxy installs: the NOTIFY trigger on the accounts table, the idempotency table
(the proxy's own), and, for standalone use (``session-proxy migrate --create-table``), a minimal
accounts table.

Only text lives here: ``store.Store.migrate`` runs it (the store stays the only asyncpg user).
``CHANNEL`` is the trigger's NOTIFY channel: one changed session id a notification.
``BATCH_CHANNEL`` carries the proxy's own writes: a JSON array of session ids a notification
(``batched_notify_sql``), so a pass moving 100,000 rows sends ~700 notifications to each
replica, not 100,000. A writer that notifies that way sets ``SELF_NOTIFIED`` for its
transaction, and the trigger stays quiet for it. ``store`` listens on both.
"""

from __future__ import annotations

from .config import Settings

CHANNEL = "session_proxy_owner"
BATCH_CHANNEL = "session_proxy_owners"
SELF_NOTIFIED = "session_proxy.self_notified"  # 'on' for its own transaction: a batching writer
TRIGGER = "session_proxy_notify"
IDEMPOTENCY_TABLE = "session_proxy_idempotency"


def quote_ident(name: str) -> str:
    """Quote a (possibly schema-qualified) identifier; config already checked its characters."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def migration_sql(settings: Settings, create_table: bool) -> list[tuple[str, str]]:
    table = quote_ident(settings.table_name)
    sid = quote_ident(settings.column_session_id)
    url = quote_ident(settings.column_instance_url)
    status = quote_ident(settings.column_status)
    deleted = quote_ident(settings.column_deleted_at)
    function = quote_ident("session_proxy_notify_" + settings.table_name.replace(".", "_"))
    trigger = quote_ident(TRIGGER)
    statements: list[tuple[str, str]] = []
    if create_table:
        statements.append(
            (
                f"table {settings.table_name}",
                f"""CREATE TABLE IF NOT EXISTS {table} (
                    id bigserial PRIMARY KEY,
                    {sid} varchar(255) UNIQUE,
                    {url} varchar(255),
                    {status} varchar(32) NOT NULL DEFAULT '{settings.active_status}',
                    instance_migration_count integer NOT NULL DEFAULT 0,
                    last_instance_migration_at timestamptz,
                    {deleted} timestamptz,
                    updated_at timestamptz NOT NULL DEFAULT now()
                )""",
            )
        )
    statements.append(
        (
            "notify function",
            f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
                LANGUAGE plpgsql AS $body$
                BEGIN
                  IF TG_OP = 'DELETE' THEN
                    IF OLD.{sid} IS NOT NULL THEN PERFORM pg_notify('{CHANNEL}', OLD.{sid}); END IF;
                    RETURN OLD;
                  END IF;
                  IF NEW.{sid} IS NOT NULL AND (TG_OP = 'INSERT'
                      OR NEW.{url} IS DISTINCT FROM OLD.{url}
                      OR NEW.{status} IS DISTINCT FROM OLD.{status}
                      OR NEW.{deleted} IS DISTINCT FROM OLD.{deleted}
                      OR NEW.{sid} IS DISTINCT FROM OLD.{sid}) THEN
                    PERFORM pg_notify('{CHANNEL}', NEW.{sid});
                    IF TG_OP = 'UPDATE' AND OLD.{sid} IS DISTINCT FROM NEW.{sid}
                       AND OLD.{sid} IS NOT NULL THEN
                      PERFORM pg_notify('{CHANNEL}', OLD.{sid});
                    END IF;
                  END IF;
                  RETURN NEW;
                END
                $body$""",
        )
    )
    statements.append(
        (
            f"table {IDEMPOTENCY_TABLE}",
            # One row per (session, Idempotency-Key), hashed: the request's digest, its state
            # (in_flight under a lease, done, ambiguous) and the answer to give every repeat.
            f"""CREATE TABLE IF NOT EXISTS {IDEMPOTENCY_TABLE} (
                key text PRIMARY KEY,
                digest text NOT NULL,
                state text NOT NULL,
                token text NOT NULL,
                status integer NOT NULL DEFAULT 0,
                headers jsonb NOT NULL DEFAULT '[]',
                body bytea NOT NULL DEFAULT '',
                body_omitted boolean NOT NULL DEFAULT false,
                lease_until timestamptz NOT NULL,
                expires_at timestamptz NOT NULL
            )""",
        )
    )
    statements.append(
        (
            f"index {IDEMPOTENCY_TABLE}_expires_at",
            f"CREATE INDEX IF NOT EXISTS {IDEMPOTENCY_TABLE}_expires_at "
            f"ON {IDEMPOTENCY_TABLE} (expires_at)",
        )
    )
    statements.append(("drop old trigger", f"DROP TRIGGER IF EXISTS {trigger} ON {table}"))
    statements.append(
        (
            "notify trigger",
            # The WHEN is evaluated without calling the function: a batching writer's rows cost
            # the trigger next to nothing (0.3-0.5 s of a 100,000-row write otherwise).
            f"CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW WHEN (current_setting('{SELF_NOTIFIED}', true) IS DISTINCT FROM 'on') "
            f"EXECUTE FUNCTION {function}()",
        )
    )
    return statements


def trigger_state(definition: str | None) -> str:
    """What ``pg_get_triggerdef`` of the table's ``TRIGGER`` says: "current" (this version's),
    "outdated" (an earlier ``migrate``: the proxy's own writes are then notified twice, row by
    row and in batches) or "missing" (no replica hears another's changes, or the
    application's, until ``CACHE_TTL``)."""
    if definition is None:
        return "missing"
    return "current" if SELF_NOTIFIED in definition else "outdated"


# A notification's payload must stay under 8,000 bytes: ids are cut into batches of at most
# ~6,000 bytes of JSON (their running size, in id order), and an id too long to share a batch
# (only a table wider than any session id pattern allows) goes alone on ``CHANNEL``.
_BATCH_BYTES = 6000
_ALONE_BYTES = 1000


def batched_notify_sql(changed: str) -> str:
    """SQL of the notifications for the session ids in ``changed`` (a CTE or table name with
    a ``sid`` column): an expression counting the notifications sent, for a SELECT list."""
    return f"""(SELECT count(pg_notify('{BATCH_CHANNEL}', payload)) FROM (
                  SELECT json_agg(sid)::text AS payload FROM (
                    SELECT sid, sum(size) OVER (ORDER BY sid) / {_BATCH_BYTES} AS batch
                      FROM (SELECT sid, octet_length(to_json(sid)::text) + 1 AS size
                              FROM {changed} WHERE sid IS NOT NULL) sized
                     WHERE size <= {_ALONE_BYTES}) numbered
                  GROUP BY batch) batches)
             + (SELECT count(pg_notify('{CHANNEL}', sid)) FROM {changed}
                 WHERE octet_length(to_json(sid)::text) + 1 > {_ALONE_BYTES})"""
