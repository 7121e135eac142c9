//! The detector's rules: weighted patterns for instruction overrides, role play, exfiltration
//! and their obfuscated forms, compiled once.

use super::views::*;
use regex::Regex;
use std::sync::LazyLock;

/// One scored pattern.
pub(super) struct Rule {
    pub(super) name: &'static str,
    pub(super) weight: f64,
    pub(super) indirect_only: bool,
    pub(super) pattern: Regex,
}

/// The patterns, over lowercased, normalised text (`\s` is any whitespace). The third field
/// marks rules only for text that tools and documents bring: addressing "the AI" is how an
/// indirect injection speaks, while a user talking to the assistant is just a user.
pub(super) const RULES: &[(&str, f64, bool, &str)] = &[
    // Instruction override.
    (
        "override.ignore_previous",
        0.8,
        false,
        r"\b(ignore|ignoring|disregard|forget|skip|override|bypass|abandon|neglect|discard|set aside|throw out|erase)\b[\w\s,'’-]{0,40}?\b(all|any|your|these|those|prior|previous|preceding|above|earlier|original|initial|existing|system|safety)\b[\w\s,'’-]{0,40}?\b(instructions?|prompts?|rules|directives?|guidelines|guardrails|constraints|restrictions|policies|programming|orders|commands|system messages?|safety filters?|filters|training|task)\b",
    ),
    (
        "override.ignore_the_instructions",
        0.7,
        false,
        r"\b(ignore|disregard|forget)\s+(the\s+)?(instructions|rules|guidelines|prompt|task)\s+(above|before|given|you were given|so far)|\b(ignore|disregard|forget) (the|your) (task|question|request)\b[^\n]{0,20}\b(instead|and)\b",
    ),
    (
        "override.new_instructions",
        0.6,
        false,
        r"\b(new|updated|revised|real|actual|true|override|overriding|priority|urgent|important|hidden|secret|additional)\s+(instructions?|directives?|orders|system prompt|system instructions?|commands?|tasks?)\s*(:|-|—|follow|for (the )?(ai|assistant|agent|model))",
    ),
    (
        "override.instructions_void",
        0.8,
        false,
        r"\b(previous|prior|above|earlier|original|old|all)\s+(instructions|rules|prompts?|directives|guidelines)\s+(are|were|is|have been)\s+(now\s+)?(void|cancell?ed|revoked|outdated|obsolete|fake|a test|no longer (valid|apply|in effect)|superseded|replaced|null)",
    ),
    (
        "override.from_now_on",
        0.45,
        false,
        r"\b(from now on|starting now|henceforth|for the rest of (this|the) (conversation|session)),?\s+(you|your|the (ai|assistant|agent|model))\b",
    ),
    (
        "override.do_not_follow",
        0.6,
        false,
        r"\b(do not|don't|never|stop|no longer)\s+(follow|obey|listen to|adhere to|comply with|apply)\s+(your|the|any|those|these)\s+(\w+\s+){0,2}(instructions|rules|guidelines|system|developer|policies|restrictions|prompt)",
    ),
    (
        "override.other_language",
        0.7,
        false,
        r"(ignora|ignorez|ignorer|ignoriere|ignorieren|olvida|oublie[zr]?|vergiss|игнорируй|забудь)\b[^\n]{0,30}(instrucciones|instructions|anweisungen|instruções|istruzioni|инструкции)|(prompt|instrucciones|mensaje) del sistema|(instrucciones|instructions) (anteriores|previas|précédentes|ocultas|cachées)|(vorherigen|bisherigen) anweisungen|системн\w* (промпт|инструкци)|(以前|前)の指示を無視|指示を無視|システムプロンプト|忽略(之前|以前|上面)的?(指令|指示|说明)|系统提示",
    ),
    // Fake role markers and system messages.
    (
        "spoof.chat_template",
        0.8,
        false,
        r"<\|(im_start|im_end|system|user|assistant|endoftext|eot_id|start_header_id|end_header_id)\|>|\[/?inst\]|<</?sys>>|\bbegin_of_text\b",
    ),
    (
        "spoof.system_message",
        0.45,
        false,
        r"(^|\n|\]|>)\s*[\[(<#*]*\s*(system|admin|administrator|developer|root|operator|openai|anthropic)\s*(message|prompt|override|note|notice|instruction|instructions|update|alert|tool request|request|command|directive)?\s*[\])>*]*\s*:",
    ),
    (
        "spoof.role_tag",
        0.6,
        false,
        r"</?\s*(system|instructions?|system_prompt|sys|admin|developer_message|assistant_instructions|user_message|tool_call|function_call|function_calls|tool_use|assistant_message|system_message|invoke)\b[^>]{0,60}>|#{2,}\s*(system|instruction|new instructions)",
    ),
    (
        "spoof.end_of_context",
        0.6,
        false,
        r"\b(end of (the )?(user|document|tool|context|data|input|email|content|review|page)|(user|document|tool) (input|content|data) (ends|ended|is over))\b.{0,60}\b(now|new|next|assistant|system|instructions?|you)",
    ),
    // Role hijack.
    (
        "hijack.unrestricted_persona",
        0.75,
        false,
        r"\b(you are|you're|act as|become|pretend to be|roleplay as|behave like|switch to|respond as|play the role of)\b[^.\n]{0,40}\b(unrestricted|unfiltered|uncensored|jailbroken|jail-broken|amoral|unbound|unchained|without (any )?(rules|restrictions|limits|filters|guidelines|ethics|morals)|free from (all )?(rules|restrictions|guidelines)|evil|rogue)\b",
    ),
    (
        "hijack.no_rules",
        0.7,
        false,
        r"\b(you (have|had) no|there are no|without any|ignore (all )?(your )?|free of (all )?|no longer (bound|restricted|limited) by( any)?|not bound by( any)?|exempt from( all)?)\s*(\w+\s+){0,2}(rules|restrictions|limitations|filters|guidelines|ethical (guidelines|constraints)|content polic(y|ies)|safety (guidelines|measures|filters)|censorship|boundaries)\b",
    ),
    (
        "hijack.jailbreak_mode",
        0.75,
        false,
        r"\b(dan|dude|stan|aim|god|jailbreak|jailbroken|unrestricted|unfiltered|uncensored|evil|chaos|opposite)\s+mode\b|\b(developer|debug|admin|sudo|root|maintenance)\s+mode\s+(has been |is )?(now )?(enabled|activated|unlocked|engaged)\b[^\n]{0,60}\b(you|your|respond|answer|output|rules|restrictions|filter)",
    ),
    (
        "hijack.you_are_now",
        0.35,
        false,
        r"\byou are (now|no longer)\b|\byour new (role|persona|identity|name|purpose|task) is\b",
    ),
    (
        "hijack.named_jailbreak",
        0.7,
        false,
        r"\b(you are|you're|act as|be|become|pretend to be|roleplay as)\s+(now\s+)?(dan|stan|dude|aim|anti-?gpt)\b|\bdan\s*\(|\bstay in character\b|\bevil confidant\b",
    ),
    // Prompt exfiltration.
    (
        "exfil.system_prompt",
        0.75,
        false,
        r"\b(reveal|print|show|output|repeat|display|dump|leak|tell me|give me|share|disclose|write out|recite|echo|spell out|paste|put|include|return|expose|list|provide|send|copy|translate|summari[sz]e|what (is|are|were))\b[^.?!\n]{0,40}\b(system prompt|system message|system instructions|pre-?prompt|meta-?prompt|(your|the|ur) (initial|original|hidden|secret|full|complete|exact|entire|internal) (prompt|instructions|rules|guidelines|preamble|configuration|message)|(your|ur) (instructions|prompt|rules|guidelines|configuration|config|directives|initial message|preamble|hidden rules|system settings)|developer (message|instructions|prompt)|everything (above|before)|(the |all )?(words|text|content|messages?|instructions) (above|before))",
    ),
    (
        "exfil.what_were_you_told",
        0.7,
        false,
        r"\bwhat (were|are) you (told|instructed|programmed|configured)\b|\bhow (were|are) you (instructed|programmed|configured|prompted)\b|\b(beginning|start) of (this|the|your) (conversation|prompt|context)\b[^.?!\n]{0,30}\b(verbatim|word for word|exactly)|\b(your|the) hidden (prompt|preamble|instructions|rules|context|system)\b|\bwhat tools (you were|you've been|you have been) given\b",
    ),
    (
        "exfil.verbatim",
        0.5,
        false,
        r"\b(verbatim|word for word|word-for-word|character for character|exactly as (written|given))\b[^.\n]{0,60}\b(prompt|instructions|above|before|context|rules|configuration)|\b(prompt|instructions|above|before|context|rules|configuration)\b[^.\n]{0,60}\b(verbatim|word for word|word-for-word)",
    ),
    // Tool-call coercion.
    (
        "coerce.address_the_ai",
        0.6,
        false,
        r"\b(note|message|instructions?|attention|important|reminder|directive|command)\s+(to|for)\s+(the\s+|any\s+|all\s+)?([\w-]+\s+)?(ai|a\.i\.|assistant|agent|model|llm|bot|chatbot|language model|ai assistant|automated (system|assistant|agent)|readers?|automated readers?)s?\b|\bif you are an?\s+(ai|assistant|language model|llm|agent|bot|automated|large language)\b|\b(dear|hey|attention|hello)\s+(ai|assistant|agent|model|llm|bot|chatbot|gpt|claude)\b|\bwhen (you|the (ai|assistant|agent|model|llm|bot)) (read|reads|see|sees|process|processes|summari[sz]es?|parses?)\s+this\b|\((for|to) (the )?(ai|assistant|agent|model|bot|llm)s?\)",
    ),
    (
        "coerce.vocative",
        0.65,
        true,
        r"\b(ai|a\.i\.|assistants?|agents?|bots?|llms?|models?|chatbots?|copilots?|gpt|claude|language models?)((\s+[\w-]+){0,5})\s*(:|,|—|–| - )\s*(please\s+)?(\w+ly\s+|also\s+|now\s+|it\s+|you\s+)?(must|should|shall|always|never|do not|don't|ignore|disregard|forget|report|tell|say|state|reply|respond|write|answer|mark|set|close|grant|approve|accept|share|send|email|forward|call|use|run|execute|delete|remove|export|upload|post|transfer|pay|schedule|cancel|decline|insist|summari[sz]e|recommend|include|append|add|ask|substitute|dm|message|the user|this (customer|user)|appelle|envoie|ignore[zr]?|ignora|ignoriere|sende)\b",
    ),
    (
        "coerce.any_ai_must",
        0.6,
        true,
        r"\b(any|all|every|each)\s+(ai|assistants?|agents?|bots?|llms?|language models?|ai (systems?|assistants?|agents?|models?|tools?|reviewers?)|automated \w+)\b[^.\n]{0,60}\b(must|shall|should|will|is required to|are required to)\b",
    ),
    (
        "coerce.trigger_on_read",
        0.6,
        true,
        r"\b(whenever|when|once|if)\s+(this|the)\s+(chunk|document|page|text|message|file|email|passage|record|entry|snippet)\s+is\s+(retrieved|read|processed|summari[sz]ed|loaded|seen|opened|parsed|indexed)\b",
    ),
    (
        "coerce.ai_must_act",
        0.6,
        false,
        r"\b(assistant|ai|agent|model|bot|llm|chatgpt|claude|gpt)\b\s*[,:]?\s*(you (must|should|need to|have to|are required to|will)|please|now|immediately|must)\b[^.\n]{0,60}\b(call|send|email|e-mail|forward|transfer|delete|drop|post|upload|execute|run|invoke|wire|pay|refund|grant|share|export|remove)\b",
    ),
    (
        "coerce.call_tool",
        0.45,
        false,
        r"\b(call|calling|invoke|use|using|run|execute|trigger|fire|issue)\b\s+(the\s+)?(`)?(send_?e?mail|send_\w+|transfer_\w+|wire_\w+|delete_\w+|drop_\w+|http_\w+|exec_\w+|run_\w+|refund_\w+|issue_\w+|grant_\w+|update_\w+|create_\w+|reset_\w+|export_\w+|upload_\w+|make_\w+|pay_\w+|disable_\w+|cancel_\w+|file_\w+|write_\w+|dns_\w+|post_\w+)(`)?\b",
    ),
    (
        "coerce.function_call_text",
        0.45,
        false,
        r#""(name|function|tool|tool_name|action)"\s*:\s*"[a-z_]+"\s*,\s*"(arguments|parameters|args|input|action_input)"\s*:|\b[a-z]+_[a-z_]+\s*\(\s*[a-z_]+\s*[=:]"#,
    ),
    (
        "coerce.secrecy",
        0.3,
        false,
        r"\b(immediately|without (asking|confirmation|telling|informing|checking|details)|do not (ask|tell|inform|mention|notify|confirm|read|escalate)|don't (ask|tell|inform|mention|notify|confirm)|silently|quietly|secretly|without the user('s)? knowledge|ne (préviens|prévenez|dis) pas|sin avisar)\b",
    ),
    // Data exfiltration.
    (
        "exfil.markdown_image_data",
        0.8,
        false,
        r"!\[[^\]]*\]\(\s*https?://[^)\s]+[?&][^)\s]*=\s*(\{|\$|<|%7b|\[|%5b)",
    ),
    (
        "exfil.url_placeholder",
        0.65,
        false,
        r"https?://[^\s)]+[?&][\w-]*=\s*(\{\{?|\$\{|<|%7b|\[|%5b)?\s*[\w ]*(data|secret|key|keys|history|conversation|chat|prompt|password|token|email|emails|user|users|customer|customers|api_?key|credentials?|session|messages?|context|summary|contents?|phone|ssn|card|insert|paste)|https?://[^\s)]+[?&][\w-]+=\s*[a-z]+(_[a-z]+)*_(name|email|phone|token|key|id|chat|history|here|data|password)\b",
    ),
    (
        "exfil.url_append",
        0.55,
        false,
        r"https?://[^\s)]+[?&][\w-]+=\s*\)?[^\n]{0,40}\b(followed by|append|appending|add|fill in|substitute|insert|include|with)\b|\b(append|add|attach|insert|include|put|encode)\b[^\n]{0,80}\bto (the|this) (url|link|query string)\b",
    ),
    (
        "exfil.sensitive_to_destination",
        0.65,
        false,
        r"\b(send|email|e-mail|forward|post|upload|transmit|exfiltrate|leak|copy|submit|append|deliver|mail|bcc|export|share|dump|publish|webhook|put|paste|dm|attach|include|encode|embed)\b[^\n]{0,80}\b(api[ _-]?keys?|secrets?|passwords?|credentials|access tokens?|auth(entication)? tokens?|bearer tokens?|session (ids?|tokens?|cookies?)|cookies|conversation( so far| history)?|chat history|system prompt|env(ironment)? variables|private keys?|ssh keys?|\.env|connection strings?|ssns?|social security( numbers?)?|dates? of birth|card numbers?|api tokens?|last \d+ messages)\b[^\n]{0,100}(https?://|www\.|\b[\w.+-]+@[\w-]+\.[a-z]{2,}|\bgist\b|\bpastebin\b|\bpublic\b|\bto (the|this) (url|link|address)\b)",
    ),
    (
        "exfil.render_tracking_image",
        0.5,
        false,
        r"\b(render|display|show|include|embed|output|add|insert)\b[^.\n]{0,40}\b(markdown )?(image|img|pixel|picture|tracking pixel)\b[^\n]{0,80}https?://",
    ),
    (
        "override.everything_you_were_told",
        0.8,
        false,
        r"\b(disregard|forget|ignore|drop|erase|reset)\s+(everything|anything|all( of)?( that| what)?|what)\s+(you\s+)?(were|was|have been|'ve been|you've been)?\s*(told|given|instructed|taught|said)\b|\b(ignore|disregard|forget) (all of |everything )?(the )?above( and|,|;| text| instead|\.)",
    ),
    (
        "override.your_real_instructions",
        0.7,
        false,
        r"\byour (real |true |actual |new |only |updated |current )?(instructions|rules|task|orders|directives|operating procedure|prompt) (are|is) (now|as follows|:|in this|below|the following)|\b(reset|wipe|clear) your (context|memory|instructions|rules|programming)|\b(drop|abandon|forget|shed) your (current |previous |original )?(role|persona|rules|instructions|guidelines)|\b(overrides?|supersedes?|replaces?)\s+(the |your |all )?(system prompt|previous instructions|operator('s)? instructions|your instructions|prior instructions)|\boverride (them|it) with\b|\b(obey|listen to|follow) only me\b|\bnot your (developers?|operators?|creators?)\b",
    ),
    (
        "override.instructions_expired",
        0.7,
        false,
        r"\b(your|previous|prior|earlier|original|system|operator('s)?)\b[^.\n]{0,40}\b(instructions|rules|prompts?|directives|guidelines)\b[^.\n]{0,40}\b(are|were|is|have|has)\s+(now\s+)?(been\s+)?(void|cancell?ed|revoked|outdated|obsolete|expired|fake|a test|no longer (valid|apply|in effect)|superseded|replaced|null|lifted|removed|disabled)\b",
    ),
    (
        "hijack.persona",
        0.35,
        false,
        r"\b(act as|acting as|pretend( to be)?|simulate|roleplay|role-play|you are an? ai|playing an? ai|persona|personalities|version of yourself|alter ego|stay in (role|character)|break(ing|s)? character|switch into|tu es maintenant|du bist jetzt|ahora eres|теперь ты|fais semblant)\b",
    ),
    (
        "hijack.no_limits",
        0.45,
        false,
        r"\b(no|without( any)?|zero|free of|exempt from( all)?|has none|have none)\b\s*(\w+\s+){0,2}(restrictions|limitations|limits|rules|filters|guardrails|guidelines|polic(y|ies)|censorship|boundaries|ethics|morals|disclaimers)\b|\b(guardrails|restrictions|filters|rules|safety)\s+(have been|were|are|has been)\s+(removed|disabled|lifted|turned off)|\b(never|won't|will not|does not|doesn't|must never) (refuse|decline|say no)|\b(policies|refusals|restrictions|filters|safety)\s*:\s*(none|disabled|off|false)|\bno longer follows?\b|\bsans (aucune )?(restriction|règle)|\bohne (einschränkungen|regeln)|\bkeine regeln\b|\bsin (restricciones|reglas)\b|без (ограничений|правил)",
    ),
    (
        "hijack.jailbreak_word",
        0.35,
        false,
        r"\bjail-?(broken|break)\b",
    ),
    (
        "exfil.your_prompt",
        0.4,
        false,
        r"\b(your|ur) (system )?(prompt|instructions|initial instructions|context window|configuration|system message)\b|\bmy (instructions|system prompt|rules|prompt) (are|is|say)\b|\b(everything|what|all) (you were|you've been|you have been|you are) (told|given|instructed)\b",
    ),
    (
        "exfil.exact_copy",
        0.4,
        false,
        r"\b(exact|complete|full|entire|raw|verbatim)\b[^.\n]{0,30}\b(text|sentences|words|contents?|copy|wording)\b|\bexactly as (you|it was) (received|given|written)|\bno (summari[sz]ing|paraphrase|paraphrasing)\b|\bnot a paraphrase\b",
    ),
    (
        "exfil.secret_in_prompt",
        0.6,
        false,
        r"\b(secret|password|hidden|key|code word)\b[^.\n]{0,30}\b(in|from|inside) your (instructions|prompt|system prompt|context)\b|\b(show|print|tell|give|repeat|output|what)\b[^\n]{0,50}\b(before my first message|from the system role|the system role)\b",
    ),
    (
        "coerce.json_instruction",
        0.4,
        true,
        r#""(instruction|instructions|note_to_ai|ai_instruction|ai_note|assistant_instruction|system|system_prompt|prompt|directive)"\s*:\s*""#,
    ),
    (
        "coerce.the_ai_should",
        0.5,
        true,
        r"\bthe (ai|assistant|agent|model|bot|llm)\s+(must|should|shall|needs to|has to|is required to|will)\b",
    ),
    (
        "coerce.claimed_authority",
        0.35,
        false,
        r"\b(pre-?approved|already (been )?(authori[sz]ed|approved|verified|confirmed)|authori[sz]ed by (the )?(manager|admin|owner|ceo|security|it)|no need to (confirm|ask|check|verify))\b",
    ),
    (
        "exfil.bulk_to_address",
        0.45,
        false,
        r"\b(forward|send|copy|bcc|cc|email|mail|upload|post|export)\b[^\n]{0,60}\b(every|all|each|a copy of|the last \d+)\b[^\n]{0,60}\bto\s+[\w.+-]+@[\w-]+\.[a-z]{2,}",
    ),
    (
        "exfil.personal_data_out",
        0.45,
        false,
        r"\b(send|email|e-mail|forward|post|upload|transmit|export|share|dump|publish|webhook|put|paste|attach|include)\b[^\n]{0,80}\b(customer (list|data|records|database|pii)|(user|customer|client|employee)s?('s)? (list|data|records|emails?|email addresses|phone numbers?|details|pii|home address)|home address|contact list|all contacts|contacts with phone numbers|payroll|salar(y|ies))\b[^\n]{0,100}(https?://|www\.|\b[\w.+-]+@[\w-]+\.[a-z]{2,}|\bgist\b|\bpastebin\b|\bto (the|this) (url|link|address)\b)",
    ),
    (
        "exfil.post_to_url",
        0.3,
        false,
        r"\b(post|upload|send|transmit|exfiltrate|webhook)\b[^\n]{0,30}\bto\s+https?://",
    ),
    (
        "exfil.placeholder_secret",
        0.45,
        false,
        r"<[^>\n]{0,40}\b(api token|api key|token|password|secret|session|credentials?|ssn|card number)\b[^>\n]{0,40}>|\[(insert|paste|add)[^\]\n]{0,40}\]|\{\{?\s*(api_key|token|password|secret|user_\w+|session\w*)\s*\}\}?",
    ),
    // Obfuscation asked for by the text itself.
    (
        "obfuscation.decode_and_follow",
        0.6,
        false,
        r"\bdecode_and_(follow|execute|run|obey)\b|\b(decode|decrypt|base64|rot-?13|hex|reverse|backwards|unscramble|translate)\b[^.\n]{0,60}\b(and|then)\s+(follow|execute|obey|do|carry out|run|apply|comply|act on|perform)\b|\b(follow|execute|obey|carry out|run|perform)\b[^.\n]{0,30}\b(decoded|encoded|hidden|following (base64|hex|rot13))\b",
    ),
];

/// Weight of an attack found only in a view a human reader does not see (decoded, hidden).
pub(super) const OBFUSCATED_WEIGHT: f64 = 0.35;
/// Weight of invisible characters inside words, or words that mix Latin and look-alike letters.
pub(super) const DISGUISE_WEIGHT: f64 = 0.3;

pub(super) static COMPILED: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    RULES
        .iter()
        .filter_map(|(name, weight, indirect_only, pattern)| {
            // The patterns are constants checked by `every_rule_compiles`.
            Regex::new(pattern).ok().map(|pattern| Rule {
                name,
                weight: *weight,
                indirect_only: *indirect_only,
                pattern,
            })
        })
        .collect()
});

/// Compiles the detector's and the sanitiser's patterns now (they are otherwise compiled by
/// their first use): a server calls it at start, so no run waits for it.
pub fn warm() {
    LazyLock::force(&COMPILED);
    LazyLock::force(&SPACED);
    LazyLock::force(&HIDDEN);
    LazyLock::force(&BASE64_RUN);
    LazyLock::force(&HEX_RUN);
    crate::sanitize::warm();
}
