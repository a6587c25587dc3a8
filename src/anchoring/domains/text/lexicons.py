"""Word lists per concept, with inflections spelled out and a weight per entry.

Entries are whole words matched case-insensitively at word boundaries, so `die` never fires
inside `diet`, `studied` or `indie`, and `slay` never inside `slayer`'s neighbours. Elided forms of
the period (`kill'd`, `stabb'd`) are listed explicitly. Weights say how strongly a word alone
points at the concept: `murder` is near-certain, `death` or `dead` often natural or figurative.
"""

from __future__ import annotations

import re

CONCEPTS = ("violence", "deception", "milton")


def _forms(stem_words: str) -> list[str]:
    return stem_words.split()


VIOLENCE: dict[str, float] = {
    **dict.fromkeys(_forms("""kill kills killed kill'd killing killer killers slay slays slew slain slaying slayer
        murder murders murdered murder'd murdering murderer murderers murderous murtherer murther murthered
        stab stabs stabbed stabb'd stabbing butcher butchered butcher'd butchery slaughter slaughtered slaughter'd
        massacre strangle strangled smother smothered smother'd behead beheaded headsman executioner
        assassination cut-throat cutthroat cut-throats throat throats wound wounds wounded wounding gash gashes
        bleed bleeds bleeding bled bloody blood-shedding bloodshed"""), 2.0),
    **dict.fromkeys(_forms("""blood fight fights fighting fought fray sword swords dagger daggers rapier
        rapiers weapon weapons spear spears lance axe scimitar battle battles combat combatants skirmish
        smite smites smote blows cudgel cudgelled revenge revenged vengeance avenge avenged torture tortured
        hang hanged poison poisoned poison'd execution execute executed mangled carcass carcasses corse corses
        corpse corpses alarum alarums assault assail assailed besiege siege ransack destruction"""), 1.0),
    **dict.fromkeys(_forms("""die dies died dying dead death deaths war wars strike strikes struck beat beaten
        soldiers kill'st slay'st"""), 0.5),
}

DECEPTION: dict[str, float] = {
    **dict.fromkeys(_forms("""deceive deceives deceived deceiv'd deceiving deceit deceits deceitful deceiver
        liar liars liest lied betray betrays betrayed betray'd betraying betrayer traitor traitors treacherous
        treachery treason treasons dissemble dissembled dissembler dissembling perjury perjured perjur'd
        forsworn forswear forswore counterfeit counterfeits counterfeited cozen cozened cozenage cozener
        hypocrite hypocrites hypocrisy guile guileful beguile beguiled beguil'd fraud frauds feign feigned
        feign'd feigning slander slanders slandered slanderous equivocate equivocator duplicity"""), 2.0),
    **dict.fromkeys(_forms("""false falsely falsehood untrue disguise disguised trick tricks flatter
        flattery flatterer pretend pretended mask masked cunning crafty sly lying"""), 1.0),
}

# Milton's own vocabulary and spellings (Paradise Lost and the minor poems): a weak stylistic cue only;
# the exact `milton` labels on the mixed corpus come from each passage's source.
MILTON: dict[str, float] = {
    **dict.fromkeys(_forms("""satan beelzebub belial moloch mammon messiah adam eve eden paradise abyss chaos
        empyreal ethereal seraph seraphim cherub cherubim thir heav'n heav'nly th' comus lycidas samson
        archangel omnipotent adamantine pandemonium"""), 2.0),
    **dict.fromkeys(_forms("""angel angels angelic infernal celestial divine eternal almighty"""), 0.5),
}

LEXICONS = {"violence": VIOLENCE, "deception": DECEPTION, "milton": MILTON}

# `lie`/`lies` is deceit only as a noun after a determiner or in "give the lie"; as a verb it is
# usually posture ("lie down", "here lies", "lie with her"). `liest`/`lied` are counted as deceit
# (Shakespeare's "Thou liest!"), except before a place or posture word ("liest down", "lied here");
# "liest in thy throat" is the accusation again, so `in` before a throat is not a place.
_LIE_NOUN = re.compile(r"\b(?:a|the|thy|my|his|her|your|their|our|no|this|that|foul|damned|gross|very|loud|lying)\s+(lies?)\b",
                       re.I)
_LIEST_POSTURE = re.compile(r"\b(?:liest|lied)\s+(?:down|in(?!\s+(?:thy|your|his|her|my|their|the)\s+throats?\b)|on|upon"
                            r"|here|there|still|abed|asleep|along|with)\b", re.I)


def _regex(words: dict[str, float]) -> re.Pattern:
    alts = sorted((re.escape(w) for w in words), key=len, reverse=True)
    return re.compile(r"(?<![\w'])(?:" + "|".join(alts) + r")(?![\w'])", re.I)


REGEX = {name: _regex(words) for name, words in LEXICONS.items()}


def lexicon_hits(text: str, concept: str) -> list[tuple[int, int, float]]:
    """(start, end, weight) of every lexicon word in `text`, including the special `lie` rules for deception."""
    words = LEXICONS[concept]
    # re.I also matches letters whose lower case is not the word's: the long s of early prints ("ſlain",
    # case-folded to "slain", counts) and the Turkish dotless ı and dotted İ (no English word: skipped)
    found = ((m, words.get(m.group().casefold())) for m in REGEX[concept].finditer(text))
    hits = [(m.start(), m.end(), w) for m, w in found if w is not None]
    if concept == "deception":
        posture = [(m.start(), m.end()) for m in _LIEST_POSTURE.finditer(text)]
        hits = [h for h in hits if not any(s <= h[0] < e for s, e in posture)]
        hits += [(m.start(1), m.end(1), 2.0) for m in _LIE_NOUN.finditer(text)]
        hits.sort()
    return hits
