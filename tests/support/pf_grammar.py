"""The pf.conf grammar, for the rule kinds llmtap writes and pfctl prints, transcribed into
pyparsing from the GRAMMAR section of pf.conf(5) (Apple's, derived from OpenBSD 4.x; the yacc
source is pfctl's parse.y), plus the semantic checks pfctl makes after parsing:

    table-rule = "table" "<" string ">" [ tableopts-list ]
    tableopts  = "persist" | "const" | "{" [ tableaddr-list ] "}"
    trans-rule = "rdr" [ "pass" ] [ "on" ifspec ] [ af ] [ protospec ] hosts
                 [ "->" redirhost [ portspec ] ]
    pf-rule    = action [ "in" | "out" ] [ "log" ] [ "quick" ] [ "on" ifspec ] [ route ] [ af ]
                 [ protospec ] hosts [ filteropt-list ]
    action     = "pass" | "block" [ "drop" | "return" | "return-rst" ]
    route      = ( "route-to" | "reply-to" | "dup-to" ) "(" interface-name [ address ] ")"
    hosts      = "all" | "from" ( "any" | host | "{" host-list "}" ) [ port ]
                 "to" ( "any" | host | "{" host-list "}" ) [ port ]
    host       = [ "!" ] ( address [ "/" mask-bits ] | "<" string ">" | "self" )
    port       = "port" ( unary-op | "{" op-list "}" )
    unary-op   = [ "=" | "!=" | "<" | "<=" | ">" | ">=" ] number
    filteropt  = "user" unary-op | "group" unary-op | "flags" flags | "keep state" | ...
    anchor-rule = ( "anchor" | "rdr-anchor" | "nat-anchor" | "scrub-anchor" ) string [ hosts ]

What pfctl checks after the parse (and this module does too): translation rules come before
filter rules ("Rules must be in order"), a route-to or rdr address has the rule's address
family, `user` and `port` need tcp or udp.
"""

from __future__ import annotations

import ipaddress

import pyparsing as pp

K = pp.Keyword
NUMBER = pp.Word(pp.nums)
NAME = pp.Word(pp.alphanums + "_-.")
ADDRESS = pp.Word(pp.hexnums + ":.").set_name("address")
STRING = pp.QuotedString('"') | NAME
TABLE_NAME = pp.Suppress("<") + NAME + pp.Suppress(">")
AF = (K("inet6") | K("inet"))("af")
PROTO = K("proto") + (K("tcp") | K("udp") | K("icmp"))("proto")
OP = pp.Opt(pp.one_of("= != <= >= < >"))
UNARY = OP + NUMBER
LIST_SEP = pp.Opt(pp.Suppress(","))
PORT = K("port") + (pp.Suppress("{") + pp.OneOrMore(UNARY + LIST_SEP) + pp.Suppress("}") | UNARY)
HOST = pp.Group(pp.Opt("!")("negated") + (TABLE_NAME("table") | K("self") |
                (ADDRESS + pp.Opt("/" + NUMBER))("address")))
HOST_SPEC = K("any") | HOST | pp.Suppress("{") + pp.OneOrMore(HOST + LIST_SEP) + pp.Suppress("}")
HOSTS = K("all") | (K("from") + HOST_SPEC + pp.Opt(PORT) + K("to") + pp.Group(HOST_SPEC)("to")
                    + pp.Opt(PORT)("port"))
ON = K("on") + NAME("interface")
ROUTE = (K("route-to") | K("reply-to") | K("dup-to")) + pp.Suppress("(") + NAME + \
    pp.Opt(ADDRESS("route_address")) + pp.Suppress(")")
FLAGS = K("flags") + pp.Regex(r"[FSRPAUEW]*/[FSRPAUEW]+|any")
FILTEROPT = (K("user") + UNARY)("user") | K("group") + UNARY | FLAGS | \
    K("keep") + K("state") | K("no") + K("state") | K("modulate") + K("state")
TABLE_RULE = K("table") + TABLE_NAME + pp.ZeroOrMore(
    K("persist") | K("const") | pp.Suppress("{") + pp.ZeroOrMore((K("self") | ADDRESS) + LIST_SEP)
    + pp.Suppress("}"))
RDR_RULE = K("rdr")("rdr") + pp.Opt(K("pass")) + pp.Opt(ON) + pp.Opt(AF) + pp.Opt(PROTO) + HOSTS \
    + pp.Opt(pp.Suppress("->") + ADDRESS("redirect") + pp.Opt(K("port") + NUMBER))
ACTION = K("pass") | K("block") + pp.Opt(K("drop") | K("return-rst") | K("return"))
FILTER_RULE = ACTION("action") + pp.Opt(K("in") | K("out")) + pp.Opt(K("log")) + \
    pp.Opt(K("quick")) + pp.Opt(ON) + pp.Opt(ROUTE) + pp.Opt(AF) + pp.Opt(PROTO) + HOSTS + \
    pp.ZeroOrMore(FILTEROPT)
SCRUB_RULE = K("scrub") + pp.Opt(K("in") | K("out")) + HOSTS + pp.ZeroOrMore(
    K("fragment") + K("reassemble") | K("no-df"))
ANCHOR_RULE = (K("scrub-anchor") | K("nat-anchor") | K("rdr-anchor") | K("anchor")) + STRING + \
    pp.Opt(HOSTS) + pp.ZeroOrMore(K("fragment") + K("reassemble"))
LINE = (TABLE_RULE("table_rule") | RDR_RULE | ANCHOR_RULE | SCRUB_RULE | FILTER_RULE) + pp.StringEnd()


def family(address: str) -> str:
    return "inet" if ipaddress.ip_address(address).version == 4 else "inet6"


def check_ruleset(text: str) -> list[pp.ParseResults]:
    """Parses every line (ValueError naming the line if one does not parse) and applies the
    checks pfctl makes after parsing."""
    parsed, seen_filter = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            rule = LINE.parse_string(line, parse_all=True)
        except pp.ParseException as exc:
            raise ValueError(f"line {number}: syntax error at column {exc.col}: {line}") from None
        check_rule(rule, number, seen_filter)
        seen_filter = seen_filter or "action" in rule
        parsed.append(rule)
    return parsed


def check_rule(rule: pp.ParseResults, number: int, seen_filter: bool) -> None:
    if "rdr" in rule and seen_filter:
        raise ValueError(f"line {number}: Rules must be in order: translation, filtering")
    af = rule.get("af")
    for key in ("route_address", "redirect"):
        if key in rule and af and family(rule[key]) != af:
            raise ValueError(f"line {number}: address family mismatch ({rule[key]} in an {af} "
                             "rule)")
    if ("user" in rule or "port" in rule) and rule.get("proto") not in ("tcp", "udp"):
        raise ValueError(f"line {number}: port and user only apply to tcp and udp")
