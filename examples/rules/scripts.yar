// Rules over scripts: interpreters named on the first line, and a few things worth a look.
rule shell_script_downloading
{
    meta:
        description = "Shell script that fetches something over the network"
    strings:
        $sh = "#!/bin/sh"
        $bash = "#!/bin/bash"
        $fetch = /(curl|wget) +(-[a-zA-Z]+ +)*https?:\/\//
    condition:
        ($sh at 0 or $bash at 0) and $fetch
}

rule perl_script
{
    strings:
        $perl = "#!/usr/bin/perl"
    condition:
        $perl at 0
}
