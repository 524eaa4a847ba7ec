-- jobs: one row per accepted request; `seq` orders them (FIFO, cursors)
CREATE TABLE jobs (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT    NOT NULL UNIQUE,
    agent         TEXT    NOT NULL,
    prompt        TEXT    NOT NULL,
    repo_path     TEXT    NOT NULL,
    timeout_s     INTEGER NOT NULL,
    extra_args    TEXT    NOT NULL DEFAULT '[]',
    status        TEXT    NOT NULL,
    key_id        TEXT,
    created_at    INTEGER NOT NULL,
    started_at    INTEGER,
    finished_at   INTEGER,
    exit_code     INTEGER,
    error         TEXT,
    result        TEXT,
    patch         BLOB,
    supervisor_pid INTEGER,
    supervisor_start INTEGER
);
CREATE INDEX jobs_status ON jobs(status, seq);
CREATE INDEX jobs_agent ON jobs(agent, seq);

-- output as it arrives, in order
CREATE TABLE job_logs (
    job_seq  INTEGER NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE,
    seq      INTEGER NOT NULL,
    stream   TEXT    NOT NULL,
    ts       INTEGER NOT NULL,
    data     BLOB    NOT NULL,
    PRIMARY KEY (job_seq, seq)
);

-- API keys: only a SHA-256 hash of the secret is ever stored
CREATE TABLE api_keys (
    id          TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL,
    hash        BLOB    NOT NULL UNIQUE,
    scopes      TEXT    NOT NULL,
    source      TEXT    NOT NULL DEFAULT 'api',
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

-- every mutating call
CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    ts         INTEGER NOT NULL,
    key_id     TEXT,
    action     TEXT    NOT NULL,
    target     TEXT,
    client     TEXT,
    outcome    TEXT    NOT NULL,
    detail     TEXT
);
