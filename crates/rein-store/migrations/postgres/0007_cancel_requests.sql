-- Who asked to cancel a run that another process was driving (NULL: nobody). The process that
-- drives the run reads it for the runs it holds, about once a second, and ends the run before
-- its next step; a process that claims or resumes the run reads it first. The first request's
-- author stays.
ALTER TABLE runs ADD COLUMN cancel_requested_by TEXT;
