// Rules over the strings `make demo` plants in its generated files, in every form YARA looks for:
// ascii, UTF-16 (wide), any case, single-byte xor, hex with wildcards and jumps, regular expressions.
rule beacon_plain
{
    strings:
        $a = "SsprYDemoBeacon"
    condition:
        $a
}

rule beacon_any_form
{
    strings:
        $a = "SsprYDemoBeacon" nocase ascii wide
        $x = "SsprYDemoBeacon" xor(0x50-0x5f)
    condition:
        any of them
}

rule updater_hex
{
    strings:
        // "CalcWinUpdater" with one byte left open and a short jump
        $h = { 43 61 6C 63 57 ?? 6E [0-2] 55 70 64 61 74 65 72 }
    condition:
        $h
}

rule payload_regex
{
    strings:
        $r = /evil-payload-[0-9a-f]{4}/
    condition:
        $r and filesize < 32KB
}
