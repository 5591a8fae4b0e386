"""The SQL the proxy installs: the NOTIFY trigger on the accounts table, the idempotency table
(the proxy's own), and, for standalone use (``session-proxy migrate --create-table``), a minimal
accounts table.

Only text lives here: ``store.Store.migrate`` runs it (the store stays the only asyncpg user).
``CHANNEL`` is the trigger's NOTIFY channel, the one ``store`` listens on.
"""

from __future__ import annotations

from .config import Settings

CHANNEL = "session_proxy_owner"
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
    trigger = quote_ident("session_proxy_notify")
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
            f"CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {function}()",
        )
    )
    return statements
