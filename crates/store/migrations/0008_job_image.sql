-- the image a job runs on, as the digest it was resolved to when accepted
-- (a tag that moves later does not change a queued job); NULL: the host's
ALTER TABLE jobs ADD COLUMN image TEXT;
