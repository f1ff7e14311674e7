//! Test participant for Switchboard.
