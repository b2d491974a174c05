// Rules over the machine's own executables: ELF files, what they link against, what they call.
rule elf_glibc_binary
{
    meta:
        description = "ELF executable or library that asks for a versioned glibc symbol"
    strings:
        $glibc = /GLIBC_2\.[0-9]{1,2}/
    condition:
        uint32(0) == 0x464C457F and $glibc
}

rule elf_process_tracing
{
    meta:
        description = "ELF binary that references ptrace (debuggers, tracers, anti-debugging)"
    strings:
        $ptrace = "ptrace" fullword
        $proc = "/proc/self/status"
    condition:
        uint32(0) == 0x464C457F and $ptrace and $proc
}

rule elf_network_client
{
    meta:
        description = "Small ELF binary resolving hosts and opening sockets"
    strings:
        $a = "getaddrinfo"
        $b = "connect"
        $c = "socket"
    condition:
        uint32(0) == 0x464C457F and all of them and filesize < 200KB
}
