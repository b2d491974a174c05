// A bundle: one file that includes the others, searched in one pass (each rule reported on its own).
include "elf_binaries.yar"
include "scripts.yar"
include "demo_tokens.yar"
