-- interactive sessions (docs/SESSIONS.md): one row per session; a live
-- session's name is unique for its owner
CREATE TABLE sessions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    agent TEXT,
    command TEXT NOT NULL,
    repo_path TEXT,
    network TEXT,
    idle_timeout_s INTEGER NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    ended_at INTEGER,
    exit_code INTEGER,
    error TEXT,
    supervisor_pid INTEGER,
    supervisor_start INTEGER
);
CREATE UNIQUE INDEX sessions_live_name ON sessions (owner, name) WHERE status = 'running';
CREATE INDEX sessions_owner ON sessions (owner, seq);
