-- a key's own network grant: what its jobs may use beyond their profile's
-- policy ("none", "host", "allow:..."); NULL: nothing beyond
ALTER TABLE api_keys ADD COLUMN network TEXT;

-- patches in parts of at most 1 MiB, so a download is read page by page
CREATE TABLE job_patch_parts (
    job_seq  INTEGER NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE,
    part     INTEGER NOT NULL,
    data     BLOB    NOT NULL,
    PRIMARY KEY (job_seq, part)
);
-- NULL: no patch was stored; 0: the job changed nothing
ALTER TABLE jobs ADD COLUMN patch_bytes INTEGER;

WITH RECURSIVE p(seq, part, off, len) AS (
    SELECT seq, 0, 1, length(patch) FROM jobs WHERE patch IS NOT NULL AND length(patch) > 0
    UNION ALL
    SELECT seq, part + 1, off + 1048576, len FROM p WHERE off + 1048576 <= len
)
INSERT INTO job_patch_parts (job_seq, part, data)
    SELECT p.seq, p.part, substr(j.patch, p.off, 1048576) FROM p JOIN jobs j ON j.seq = p.seq;
UPDATE jobs SET patch_bytes = length(patch) WHERE patch IS NOT NULL;
UPDATE jobs SET patch = NULL;
