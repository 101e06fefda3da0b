"""The PostgreSQL broker's tables and statements (postgres.py uses them)."""

import hashlib

NOTIFY_CHANNEL = "comet_events"
LOCK_KEY = 0x636F6D6574  # "comet": the publishers' advisory lock


def installation_names(schema: str | None) -> tuple[str, int]:
    """The NOTIFY channel and the publishers' advisory lock key of the tables made in
    ``schema``: NOTIFY channels and advisory locks span the whole database, and the
    tables of each schema are an installation of their own (events from another one
    would be delivered, and their ids taken for this one's)."""
    if schema in (None, "public"):
        return NOTIFY_CHANNEL, LOCK_KEY
    digest = hashlib.sha256(schema.encode()).hexdigest()
    return f"{NOTIFY_CHANNEL}_{digest[:16]}", int(digest[16:31], 16)


# Prunes every channel with an event among the ids above %(since)s down to its newest
# %(keep)s rows, and records the newest id removed from each as its lost_id; one
# statement, in the publishing transaction (which holds the advisory lock).
PRUNE = """
WITH cut AS (
    SELECT c.channel, k.id
    FROM (SELECT DISTINCT channel FROM comet_event WHERE id > %(since)s) AS c
    CROSS JOIN LATERAL (
        SELECT id FROM comet_event WHERE channel = c.channel
        ORDER BY id DESC OFFSET %(keep)s LIMIT 1
    ) AS k
), gone AS (
    DELETE FROM comet_event AS e USING cut WHERE e.channel = cut.channel AND e.id <= cut.id
)
INSERT INTO comet_channel (channel, lost_id) SELECT channel, id FROM cut
ON CONFLICT (channel) DO UPDATE SET lost_id = GREATEST(comet_channel.lost_id, EXCLUDED.lost_id)
"""

# The newest events of each channel above an id (one more than the history size, to tell
# whether some were cut) and the channel's lost_id, in one statement: one snapshot, so a
# prune between two reads cannot hide a gap.  A channel without events gives one row
# with a NULL id.
SINCE = """
SELECT e.id, c.channel, e.name, e.data, coalesce(l.lost_id, 0)
FROM unnest(%(channels)s::text[]) AS c (channel)
LEFT JOIN comet_channel AS l ON l.channel = c.channel
LEFT JOIN LATERAL (
    SELECT id, name, data FROM comet_event
    WHERE channel = c.channel AND id > %(after)s
    ORDER BY id DESC LIMIT %(limit)s
) AS e ON true
"""

# Sets the id sequence to %(seen)s unless it is there already (or past it).
MOVE_IDS_PAST = """
SELECT setval(s.seq, %(seen)s)
FROM (SELECT pg_get_serial_sequence('comet_event', 'id')::regclass AS seq) AS s
WHERE coalesce(pg_sequence_last_value(s.seq), 0) < %(seen)s
"""

# The event just inserted as ``%(id)s``, given the sequence's next id (MOVE_IDS_PAST first).
MOVE_ROW_PAST_IDS = """
UPDATE comet_event SET id = nextval(pg_get_serial_sequence('comet_event', 'id'))
WHERE id = %(id)s RETURNING id
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS comet_event (
    id bigserial PRIMARY KEY,
    channel text NOT NULL,
    name text,
    data text NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS comet_event_channel_id ON comet_event (channel, id);
CREATE TABLE IF NOT EXISTS comet_channel (
    channel text PRIMARY KEY,
    lost_id bigint NOT NULL
);
"""

# Whether the tables are there (made by another role, maybe: one that may only use them
# cannot run the CREATE ... IF NOT EXISTS, which asks for CREATE on the schema first).
TABLES_MADE = """
SELECT to_regclass('comet_event') IS NOT NULL
    AND to_regclass('comet_event_channel_id') IS NOT NULL
    AND to_regclass('comet_channel') IS NOT NULL
"""

NEWEST_ID = "SELECT coalesce(max(id), 0) FROM comet_event"

# A transaction that holds the advisory lock every publisher needs: should its client
# stall inside it (a paused VM or process, a partition), PostgreSQL ends it after this
# long, rather than every publish of every process waiting for as long as it stalls.
STALLED_PUBLISHER = "SET LOCAL idle_in_transaction_session_timeout = '5s'"

# Events by id, oldest first, as many as %(budget)s bytes take (one at least); ids above
# the last one returned are read by the next query (below it: pruned).
SELECT_EVENTS = """
SELECT id, channel, name, data FROM (
    SELECT id, channel, name, data,
        sum(octet_length(data)) OVER (ORDER BY id) - octet_length(data) AS before
    FROM comet_event WHERE id = ANY(%(ids)s)
) AS e WHERE before < %(budget)s ORDER BY id
"""
