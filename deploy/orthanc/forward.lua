-- dicom-covid: forward chest X-ray studies from Orthanc to the dicom-covid service.
-- RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
--
-- Orthanc calls OnStableStudy once no instance of a study arrived for "StableAge" seconds.
-- The script sends the study's CR and DX series to the DicomModalities entry "dicomcovid"
-- (C-STORE, one association). dicom-covid answers with one Comprehensive SR and one Grad-CAM
-- Secondary Capture per image, stored back into the same study.
--
-- No loops: series made by dicom-covid (Manufacturer "dicom-covid developers"; the SR is
-- modality SR and the Secondary Capture OT, so neither is CR/DX anyway) are never sent, and an
-- instance is sent only once: after a successful transfer it gets the user metadata
-- "DicomCovidForwarded" (declare it in "UserMetadata"). When our results arrive and the study
-- becomes stable again, nothing is left to send. dicom-covid itself also recognises and skips
-- its own results and re-sent instances.
--
-- Several listeners (a multi-node dicom-covid sharing one job store): declare one
-- DicomModalities entry per listener, each named "dicomcovid" or starting with "dicomcovid-"
-- ("dicomcovid-1", "dicomcovid-2", ...). Each study goes to one of them, chosen from its
-- Orthanc id (so the load spreads and a study's images stay together); when that listener
-- does not take the study, the next one is tried, and so on.
--
-- If no listener takes it the transfer fails, nothing is marked, and the images are sent at
-- the study's next stable event (new images), or by hand:
--   curl -X POST http://localhost:8042/modalities/dicomcovid/store -d '["<study id>"]'

local PREFIX = 'dicomcovid'                   -- "DicomModalities" keys of the listeners
local FORWARD = { CR = true, DX = true }      -- Modality values to send
local OWN_PREFIX = 'dicom-covid'              -- Manufacturer prefix of our own results
local FORWARDED = 'DicomCovidForwarded'       -- user metadata marking sent instances

local function startsWith(value, prefix)
  if value == nil then
    return false
  end
  return string.lower(string.sub(value, 1, #prefix)) == string.lower(prefix)
end

local function alreadySent(instanceId)
  local names = ParseJson(RestApiGet('/instances/' .. instanceId .. '/metadata'))
  for _, name in ipairs(names or {}) do
    if name == FORWARDED then
      return true
    end
  end
  return false
end

-- The listeners, in a fixed order starting at the one this study is assigned to.
local function listenersFor(studyId)
  local names = {}
  for _, name in ipairs(ParseJson(RestApiGet('/modalities')) or {}) do
    if name == PREFIX or startsWith(name, PREFIX .. '-') then
      table.insert(names, name)
    end
  end
  table.sort(names)
  local hash = 0
  for i = 1, #studyId do
    hash = (hash * 31 + string.byte(studyId, i)) % 1000003
  end
  local ordered = {}
  for k = 0, #names - 1 do
    table.insert(ordered, names[(hash + k) % #names + 1])
  end
  return ordered
end

function OnStableStudy(studyId, tags, metadata)
  local toSend = {}
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  for _, s in ipairs(series or {}) do
    local t = s['MainDicomTags'] or {}
    if FORWARD[t['Modality'] or ''] and not startsWith(t['Manufacturer'], OWN_PREFIX) then
      for _, instanceId in ipairs(s['Instances'] or {}) do
        if not alreadySent(instanceId) then
          table.insert(toSend, instanceId)
        end
      end
    end
  end
  if #toSend == 0 then
    return
  end
  local request = DumpJson({ Resources = toSend, Synchronous = true }, true)
  local failures = {}
  for _, modality in ipairs(listenersFor(studyId)) do
    local ok, answer = pcall(RestApiPost, '/modalities/' .. modality .. '/store', request)
    if ok and answer ~= nil then
      for _, instanceId in ipairs(toSend) do
        RestApiPut('/instances/' .. instanceId .. '/metadata/' .. FORWARDED, 'yes')
      end
      print('dicom-covid: sent ' .. #toSend .. ' instance(s) of study ' .. studyId ..
            ' to ' .. modality)
      return
    end
    table.insert(failures, modality .. ': ' .. tostring(answer))
    print('dicom-covid: ' .. modality .. ' did not take study ' .. studyId ..
          '; trying the next listener')
  end
  print('dicom-covid: sending study ' .. studyId .. ' failed (' .. table.concat(failures, '; ') ..
        '); it is sent again at its next stable event')
end
