#pragma once
// Bumped whenever an op's argument list changes, so a stale build is detected, not misused.
#define FASTITM_NATIVE_ABI 3
